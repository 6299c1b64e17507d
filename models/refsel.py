"""RefSel-style conflict-mask network (RefSTAR, arXiv:2507.10470, RefSTAR §"Reference Selection Module").

A U-Net (Ronneberger et al. 2015) on the channel concatenation [degraded target, reference] that
predicts, per pixel of the reference, p = softmax(f_M(I_LQ, I_Ref; Θ_M)) over three classes in the
mask contract's order: 0 consistent (may be transferred), 1 conflict, 2 ignore (background, hair; the
contract's 255). The paper's module is binary; the ignore class lets one network write complete masks
by the contract. Trained with the OHEM cross-entropy of eq. 2:

    L_OHEM-CE = −(1/|M'|) Σ_{i∈M'} m_i log p_i

where M' is the set of hard pixels: those whose probability of the true class is below `thresh`, and
at least `min_kept_fraction` of the valid pixels (the hardest first) — the usual OHEM rule (the paper
gives no constants; ours are in params.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MASK_CONSISTENT, MASK_CONFLICT, MASK_IGNORE = 0, 1, 255
CLASSES = ("consistent", "conflict", "ignore")


@dataclass(frozen=True)
class RefSelConfig:
    widths: tuple[int, ...] = (16, 32, 64, 128)
    in_channels: int = 6  # degraded target RGB + reference RGB


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.GroupNorm(min(8, cout), cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.GroupNorm(min(8, cout), cout),
        nn.SiLU(),
    )


class RefSelUNet(nn.Module):
    """U-Net: len(widths) − 1 poolings, skip connections by concatenation, 3-class logits."""

    def __init__(self, cfg: RefSelConfig = RefSelConfig()):
        super().__init__()
        self.cfg = cfg
        w = cfg.widths
        self.down = nn.ModuleList(
            [_block(cfg.in_channels, w[0])] + [_block(w[i], w[i + 1]) for i in range(len(w) - 1)]
        )
        self.up = nn.ModuleList(nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in range(len(w) - 1))
        self.dec = nn.ModuleList(_block(2 * w[i], w[i]) for i in range(len(w) - 1))
        self.head = nn.Conv2d(w[0], len(CLASSES), 1)

    def forward(self, lq: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Logits (B, 3, H, W) for lq, ref (B, 3, H, W) in [-1, 1]; H, W divisible by 2^(levels−1)."""
        f = 2 ** (len(self.cfg.widths) - 1)
        if lq.shape[-1] % f or lq.shape[-2] % f:
            raise ValueError(f"RefSel input {tuple(lq.shape[-2:])} must be divisible by {f}")
        x = torch.cat([lq, ref], 1)
        skips = []
        for i, blk in enumerate(self.down):
            x = blk(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], 1))
        return self.head(x)


def mask_to_target(mask: torch.Tensor) -> torch.Tensor:
    """Contract mask (…, H, W) uint8 {0, 1, 255} → class index {0, 1, 2} (long)."""
    t = mask.long().clone()
    t[mask == MASK_IGNORE] = 2
    return t


def probs_to_mask(probs: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) probabilities → contract masks (B, H, W) uint8 by the most probable class."""
    cls = probs.argmax(1)
    out = torch.zeros_like(cls, dtype=torch.uint8)
    out[cls == 1] = MASK_CONFLICT
    out[cls == 2] = MASK_IGNORE
    return out


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    thresh: float = 0.7,
    min_kept_fraction: float = 0.25,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 2: mean cross-entropy over the hard pixels M' (see the module docstring).

    logits (B, K, H, W), target (B, H, W) class indices; `valid` (B, H, W) bool excludes pixels (e.g.
    ones nobody annotated). A pixel is hard when p_true < thresh; if fewer than min_kept_fraction of
    the valid pixels are hard, the hardest min_kept_fraction are kept instead.
    """
    ce = F.cross_entropy(logits, target, reduction="none").flatten()  # −log p_true
    v = valid.flatten() if valid is not None else torch.ones_like(ce, dtype=torch.bool)
    ce = ce[v]
    if ce.numel() == 0:
        return logits.sum() * 0.0
    hard = ce > -torch.log(torch.tensor(thresh, dtype=ce.dtype, device=ce.device))
    min_kept = max(1, int(min_kept_fraction * ce.numel()))
    if int(hard.sum()) < min_kept:
        return ce.topk(min_kept).values.mean()
    return ce[hard].mean()
