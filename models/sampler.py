"""Euler flow-matching sampler with FLUX.2's resolution-dependent shift and classifier-free guidance.

σ_i = shift(linspace(1, 1/N, N)) with shift(t) = e^μ / (e^μ + 1/t − 1) and μ from
`compute_empirical_mu(image_seq_len, N)` (FLUX.2 klein); then z ← z + (σ_{i+1} − σ_i)·û, ending at
σ = 0. Guidance: û = û_∅ + g·(û_c − û_∅) with û_∅ the empty-prompt branch. For 512² (1,024 tokens)
and 12 steps the schedule is [1, .988, .973, .956, .935, .910, .878, .837, .783, .706, .590, .396, 0].

Seed 002's guidance replaces the prompt guidance when asked for (models.guidance): eq. 5 with separate
scales for the degraded input (`guidance_image`, s_i) and the reference context (`guidance_context`,
s_c), and the multi-reference ensemble of eq. 6 (`ref_ensemble`); the prompt is the conditional one in
every branch.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from models.guidance import guided_prediction
from models.iconface import stack_conditionings, with_layout
from models.losses import time_shift


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's μ (diffusers `compute_empirical_mu`, reproduced to keep it testable and pinned)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + (m_200 - 200.0 * a))


def flux2_sigmas(num_steps: int, image_seq_len: int) -> torch.Tensor:
    """The shifted schedule (num_steps + 1,) from 1 down to 0."""
    mu = empirical_mu(image_seq_len, num_steps)
    t = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    s = time_shift(t, math.exp(mu))
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


@torch.no_grad()
def sample(
    model,
    cond,
    empty_text: torch.Tensor,
    shape: tuple[int, ...],
    steps: int = 12,
    guidance: float = 4.0,
    seed: int = 42,
    sigma_max: float = 1.0,
    guidance_image: float | None = None,
    guidance_context: float | None = None,
    ref_ensemble: bool = False,
    batch_cfg: bool = False,
) -> torch.Tensor:
    """Restored latents (B, C, H, W) for `cond` (see `IConFace.forward`); 0–3 references per sample.

    sigma_max = 1 is the recipe: start from pure noise on the shifted schedule. sigma_max < 1 starts
    from the degraded latent noised to that level, z = (1 − σ_max)·z_deg + σ_max·ε (eq. 1 with the
    degraded latent in place of the clean one), and walks the shifted schedule rescaled to σ_max.

    guidance_image (s_i), guidance_context (s_c), ref_ensemble: seed 002's eq. 5 / eq. 6
    (models.guidance); an unset scale is 1. They replace the prompt guidance, so `guidance` must then
    be 1 (an error otherwise: two guidance rules at once are not defined).

    batch_cfg: the conditional and the empty-prompt branch run as one batch of 2B (one forward per step
    instead of two; equal to the two forwards up to floating-point summation order). Off by default: on
    an H200 with klein at 512² and 3 references a forward already fills the GPU, and the batch of two was
    no faster (docs/results.md). The reference layout is read from the mask once, before the loop, so no
    step waits on the device.
    """
    dual = guidance_image is not None or guidance_context is not None or ref_ensemble
    if dual and guidance != 1.0:
        raise ValueError(
            f"guidance {guidance} (prompt guidance) and guidance_image/guidance_context/ref_ensemble (seed "
            "002's eqs. 5-6) exclude each other: set guidance to 1.0"
        )
    s_i = 1.0 if guidance_image is None else float(guidance_image)
    s_c = 1.0 if guidance_context is None else float(guidance_context)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=g, device=g.device).to(cond.deg)
    sigmas = flux2_sigmas(steps, shape[-1] * shape[-2]).to(noise.device) * sigma_max
    z = noise if sigma_max >= 1.0 else (1 - sigma_max) * cond.deg + sigma_max * noise
    if not dual:
        cond = with_layout(cond)
    uncond = replace(cond, text=empty_text.expand_as(cond.text)) if guidance != 1.0 else None
    both = stack_conditionings(cond, uncond) if uncond is not None and batch_cfg and not dual else None
    b = shape[0]
    for i in range(steps):
        s = sigmas[i].expand(b)
        if dual:
            u = guided_prediction(model, z, s, cond, s_i, s_c, ref_ensemble)
        elif both is not None:
            u, u0 = model(torch.cat([z, z]), sigmas[i].expand(2 * b), both).chunk(2)
            u = u0 + guidance * (u - u0)
        else:
            u = model(z, s, cond)
            if uncond is not None:
                u0 = model(z, s, uncond)
                u = u0 + guidance * (u - u0)
        z = z + (sigmas[i + 1] - sigmas[i]) * u
    return z
