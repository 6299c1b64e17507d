"""Seed 002's guidance (Composite Context, arXiv:2505.21905, Sec. 3.3) and its classifier-free-guidance training drops.

Eq. 5 (after Brooks et al.'s two-condition guidance), with s_i for the degraded input z_LQ and s_c for
the context c:

    ε̃ = (1 − s_i)·ε(z_t, ∅, ∅) + (s_i − s_c)·ε(z_t, z_LQ, ∅) + s_c·ε(z_t, z_LQ, c)

Eq. 6, the training-free multi-reference ensemble over N references' contexts c_1..c_N:

    ε̃ = (1 − s_i)·ε(z_t, ∅, ∅) + (s_i − s_c)·ε(z_t, z_LQ, ∅) + (s_c / N)·Σ_n ε(z_t, z_LQ, c_n)

The coefficients sum to 1, so the same combination of velocities (or of any affine parameterisation of
the network output, such as x0_residual) is the combination of ε's. With s_i = s_c = s eq. 5 is plain
classifier-free guidance against ε(z_t, ∅, ∅); with N = 1 eq. 6 is eq. 5.

What ∅ means here (the branches are built on the model's `Conditioning`, so one mapping serves both
conditionings):

* c = ∅ (`drop_context`): every reference slot masked (ref_mask all False). For the composite model
  that masks every context token's key, as its training drops components (Sec. 4: "dropped through
  attention masking"). For IConFace, which has no composite context, the context is its reference
  conditioning: masked references are its blind mode (no reference tokens, the degraded image's own
  identity embedding as anchor). This mapping is ours.
* z_LQ = ∅ (`drop_image`): the degraded latent and its identity embedding set to zeros, as Brooks et
  al. drop the image condition of InstructPix2Pix (a zero latent). Ours, not the paper's words: our
  degraded image also feeds the structure pathway, the degraded readout and the x0_residual base,
  which key masking would not reach; zeros reach them all. An IConFace checkpoint never trained
  without its degraded input: s_i ≠ 1 queries a branch it has not learned.
* A sample without references has ε(z_LQ, c) = ε(z_LQ, ∅) (its slots are masked), and eq. 6 with
  N = 0 is taken as that prediction (ours; the paper's N ≥ 1).
"""

from __future__ import annotations

from dataclasses import replace

import torch


def dual_guidance(
    u_none: torch.Tensor | float,
    u_image: torch.Tensor | float,
    u_full: torch.Tensor,
    s_i: float,
    s_c: float,
) -> torch.Tensor:
    """Eq. 5: (1 − s_i)·u(∅, ∅) + (s_i − s_c)·u(z_LQ, ∅) + s_c·u(z_LQ, c)."""
    return (1 - s_i) * u_none + (s_i - s_c) * u_image + s_c * u_full


def drop_context(cond):
    """The c = ∅ branch: every reference slot masked (module docstring)."""
    return replace(cond, ref_mask=torch.zeros_like(cond.ref_mask))


def drop_image(cond, rows: torch.Tensor | None = None):
    """The z_LQ = ∅ branch: the degraded latent and its identity embedding zeroed (all rows, or the rows
    where `rows` (B,) is True)."""
    if rows is None:
        return replace(cond, deg=torch.zeros_like(cond.deg), z_deg=torch.zeros_like(cond.z_deg))
    d = rows.view(-1, *([1] * (cond.deg.ndim - 1))).to(cond.deg.device)
    return replace(
        cond,
        deg=torch.where(d, torch.zeros_like(cond.deg), cond.deg),
        z_deg=torch.where(rows.view(-1, 1).to(cond.z_deg.device), torch.zeros_like(cond.z_deg), cond.z_deg),
    )


def reference_slot(cond, k: int):
    """The conditioning with reference slot k alone (B, 1, ...): c_k of eq. 6."""
    s = slice(k, k + 1)
    return replace(
        cond,
        refs=cond.refs[:, s],
        ref_mask=cond.ref_mask[:, s],
        z_refs=cond.z_refs[:, s],
        ref_images=None if cond.ref_images is None else cond.ref_images[:, s],
        ref_tokens=None if cond.ref_tokens is None else cond.ref_tokens[:, s],  # RefSTAR's masks
    )


def ensemble_mean(preds: list[torch.Tensor], ref_mask: torch.Tensor) -> torch.Tensor:
    """(1/N_b)·Σ_k valid_bk·u_k per sample b (eq. 6's sum), N_b its valid references; a sample without
    any takes preds[0] (its masked-slot prediction, ε(z_LQ, ∅))."""
    m = ref_mask.to(preds[0].dtype)  # (B, R)
    shape = (-1, *([1] * (preds[0].ndim - 1)))
    total = sum(m[:, k].view(shape) * u for k, u in enumerate(preds))
    n = m.sum(1).view(shape)
    return torch.where(n > 0, total / n.clamp_min(1), preds[0])


def guided_prediction(
    model, z: torch.Tensor, sigma: torch.Tensor, cond, s_i: float, s_c: float, ensemble: bool
):
    """ε̃ of eq. 5 (or eq. 6 when `ensemble`: one forward per reference slot) from `model(z, σ, cond)`.
    Branches whose coefficient is zero are not evaluated."""
    r = cond.refs.shape[1] if cond.refs.ndim == 5 else 0
    if ensemble and r > 1:
        u_full = ensemble_mean([model(z, sigma, reference_slot(cond, k)) for k in range(r)], cond.ref_mask)
    else:
        u_full = model(z, sigma, cond)
    u_image = model(z, sigma, drop_context(cond)) if s_i != s_c else 0.0
    u_none = model(z, sigma, drop_image(drop_context(cond))) if s_i != 1 else 0.0
    return dual_guidance(u_none, u_image, u_full, s_i, s_c)


def draw_cfg_drops(b: int, p_image: float, p_context: float, generator: torch.Generator) -> torch.Tensor:
    """(B, 3) bool: per sample, independently, drop z_LQ (column 0, probability p_image), the identity
    token (1) and the general tokens (2) of the composite context (p_context each) — Sec. 4: "randomly
    drop the LQ condition as well as the components in Composite Context independently with a 0.1
    probability"."""
    u = torch.rand(b, 3, generator=generator, device=generator.device)
    return u < torch.tensor([p_image, p_context, p_context])


def apply_cfg_drops(cond, drops: torch.Tensor):
    """The training conditioning with `draw_cfg_drops`' drops applied: z_LQ rows zeroed (`drop_image`),
    context components masked through `Conditioning.ctx_drop`."""
    cond = drop_image(cond, drops[:, 0]) if bool(drops[:, 0].any()) else cond
    return replace(cond, ctx_drop=drops[:, 1:3].to(cond.ref_mask.device))
