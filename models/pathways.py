"""IConFace's pathways around the FLUX.2 transformer (IConFace, arXiv:2605.02814, and its supplement),
and our degradation-removal front end; `models.iconface.IConFace` places them around the blocks.

* Global identity pathway (eqs. 3–5): `aggregate_identity` / `identity_anchor` give e_id,
  `IdentityPathway` turns it into the double and single blocks' modulation offsets.
* Degraded structure pathway (eqs. 6–7): `LowRankResidual` (the input residual), `QueryPooler` (the base
  and detail memory routes, detail on x_deg − `smooth_tokens`(x_deg)), `MemoryCrossAttention` (after
  every block, gated from zero).
* `ReferenceReadout` (ours): the head's aligned fusion of the references' final tokens.
* `DegradationEmbedding` (ours): the modulation's offset from the degraded input's log-sharpness
  (`sharpness_tensor`, the reference gate's statistic in torch).
* `FrontEnd` (ours; DiffBIR's stage 1): a small residual CNN trained by L2 before the transformer, with
  `save_front` / `load_front` for its weights.
Every addition starts at zero, so at initialisation IConFace equals the stock forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H·W, C), row-major."""
    return latents.flatten(2).transpose(1, 2)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H·W, C) → (B, C, H, W)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


# ==================================================================================================
# Identity pathway (eqs. 3–5)
# ==================================================================================================


def aggregate_identity(
    z_refs: torch.Tensor, ref_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """e_ref = Norm(Σ_r w_r e_r), w = softmax(log q_r / T) over valid references (eqs. 3–4).

    z_refs (B, R, D) raw embeddings, ref_mask (B, R) bool. Rows without any valid reference return
    zeros (the caller substitutes the degraded-image fallback). With T = 1, w_r = q_r / Σ q.
    """
    q = z_refs.norm(dim=-1).clamp_min(1e-12)  # (B, R)
    e = z_refs / q.unsqueeze(-1)  # (B, R, D)
    logits = torch.where(ref_mask, q.log() / temperature, torch.full_like(q, -torch.inf))
    w = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # (B, R); all-masked rows → 0
    return F.normalize((w.unsqueeze(-1) * e).sum(1), dim=-1) * ref_mask.any(1, keepdim=True)


def identity_anchor(
    z_refs: torch.Tensor, ref_mask: torch.Tensor, z_deg: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """e_id: the reference anchor, or the normalised degraded-image embedding where no reference exists."""
    e_ref = aggregate_identity(z_refs, ref_mask, temperature) if z_refs.shape[1] else torch.zeros_like(z_deg)
    has = (
        ref_mask.any(1, keepdim=True)
        if ref_mask.shape[1]
        else torch.zeros_like(z_deg[:, :1], dtype=torch.bool)
    )
    return torch.where(has, e_ref, F.normalize(z_deg, dim=-1))


class IdentityPathway(nn.Module):
    """φ_global, ψ_dbl, ψ_sgl (eq. 5): e_id (B, 512) → Δ_dbl (B, 6D), Δ_sgl (B, 3D); ψ's start at zero."""

    def __init__(self, id_dim: int, dim: int):
        super().__init__()
        self.phi_global = nn.Sequential(nn.Linear(id_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.psi_dbl = nn.Linear(dim, 6 * dim)
        self.psi_sgl = nn.Linear(dim, 3 * dim)
        for m in (self.psi_dbl, self.psi_sgl):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, e_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.phi_global(e_id)  # (B, D)
        return self.psi_dbl(F.silu(h)), self.psi_sgl(F.silu(h))


# ==================================================================================================
# Degraded structure pathway (eqs. 6–7)
# ==================================================================================================


class LowRankResidual(nn.Module):
    """s_deg · W_in(x_deg) with W_in = up ∘ down of rank r; `up` starts at zero (eq. 6)."""

    def __init__(self, channels: int, rank: int, s_deg: float):
        super().__init__()
        self.down = nn.Linear(channels, rank, bias=False)
        self.up = nn.Linear(rank, channels, bias=False)
        nn.init.zeros_(self.up.weight)
        self.s_deg = s_deg

    def forward(self, x_deg: torch.Tensor) -> torch.Tensor:
        return self.s_deg * self.up(self.down(x_deg))  # (B, L, C)


def smooth_tokens(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """3×3 box average over the token grid (replicate borders): (B, H·W, D) → (B, H·W, D)."""
    g = unpack(x, h, w)  # (B, D, H, W)
    g = F.avg_pool2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return pack(g)


class QueryPooler(nn.Module):
    """Learned-query attention pooling: (B, L, D) → (B, M, D), M learned queries."""

    def __init__(self, dim: int, n_queries: int, heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, dim) * dim**-0.5)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.norm(x)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, kv, kv, need_weights=False)[0]  # (B, M, D)


class MemoryCrossAttention(nn.Module):
    """h + γ·Attn(Q h, K M, V M) with rank-r projections and γ = 0 at start (eq. 7, last line)."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.q = nn.Linear(dim, rank, bias=False)
        self.k = nn.Linear(dim, rank, bias=False)
        self.v = nn.Linear(dim, rank, bias=False)
        self.out = nn.Linear(rank, dim, bias=False)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, h: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.q(self.norm(h)).unsqueeze(1)  # (B, 1, L, r)
        k, v = self.k(memory).unsqueeze(1), self.v(memory).unsqueeze(1)  # (B, 1, M, r)
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, L, r)
        return h + self.gate * self.out(a)


class ReferenceReadout(nn.Module):
    """Δ = Σ_r k_r·g([LN(h); LN(h_ref,r)]) / max(1, Σ_r k_r) at every grid position (ours; module
    docstring, "Reference readout").

    h (B, HW, D) the head's input at each scene position, h_refs (B, R, HW, D) the final hidden states
    of the references' tokens at the same positions, keep (B, R, HW) bool: padded references and
    RefSTAR's masked tokens are False and contribute exactly nothing. g is a two-layer MLP whose last
    layer starts at zero, so at initialisation the output is unchanged; with no kept token Δ = 0.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.inp = nn.Linear(2 * dim, dim)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, h_refs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.norm(h).unsqueeze(1).expand_as(h_refs), self.norm(h_refs)], -1)
        d = self.out(F.silu(self.inp(x)))  # (B, R, HW, D)
        k = keep.unsqueeze(-1)
        d = torch.where(k, d, torch.zeros_like(d))
        return d.sum(1) / k.sum(1).clamp_min(1).to(d.dtype)


# ==================================================================================================
# Degradation-removal front end (ours, for the CPU models)
# ==================================================================================================


class FrontEnd(nn.Module):
    """x + f(x) on the degraded image (B, 3, H, W) in [-1, 1]: a small residual CNN at full and half
    resolution whose last layer starts at zero (so at initialisation it passes the image through).

    DiffBIR's two stages (Lin et al., ECCV 2024): a restoration module trained by L2 removes the
    degradation, and the generative model conditions on its output. On the CPU default the transformer
    sees 8×8-pixel tokens of a 64-pixel face through one linear layer; local deblurring and denoising
    inside and across patches are what it learns slowest (0.1 dB in 400 steps, where a residual CNN
    learns 2.1 dB in 6 minutes). The front end takes that local work (its own L2 loss, ours), and the
    IConFace transformer conditions on the cleaned image: its degraded tokens x_deg (eq. 2), the
    structure pathway (eqs. 6-7), the blind identity fallback and the x0_residual base. It is
    reference-blind: identity from the references reaches the output only through the transformer.
    """

    def __init__(self, width: int):
        super().__init__()
        act = nn.SiLU()
        self.inp = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), act)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), act)
        self.mid = nn.Sequential(
            *[m for _ in range(4) for m in (nn.Conv2d(2 * width, 2 * width, 3, padding=1), act)]
        )
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2 * width, width, 3, padding=1), act
        )
        self.out = nn.Conv2d(2 * width, 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.inp(x)
        return x + self.out(torch.cat([a, self.up(self.mid(self.down(a)))], 1))


def save_front(front: FrontEnd, path) -> None:
    """The front end's weights (safetensors, its width in the metadata; byte-reproducible: two metadata
    keys through safetensors' own save_file came out in a per-process order)."""
    from models.safetensors_io import save_file

    width = front.inp[0].out_channels
    save_file(
        {k: v.detach().contiguous() for k, v in front.state_dict().items()},
        str(path),
        metadata={"format": "refface-front-end", "width": str(width)},
    )


def load_front(front: FrontEnd, path) -> None:
    """Load `save_front`'s file into `front`; a missing file or another width is a clear error."""

    from safetensors import safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"front end weights {path} not found (run `dvc repro train_front`)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    width = front.inp[0].out_channels
    if meta.get("format") != "refface-front-end" or meta.get("width") != str(width):
        raise ValueError(
            f"{path}: not a front end of width {width} (metadata {meta}); set train.front_end to the "
            "width train_front was trained with"
        )
    front.load_state_dict(load_file(str(path)))


def sharpness_tensor(x: torch.Tensor) -> torch.Tensor:
    """(B,) `pipelines.reference_gate.sharpness` of a batch (B, 3, H, W) in [-1, 1] as the model
    receives it, in torch (on its device, no gradient): the images rounded to uint8 levels, grey by ITU-R BT.601 rounded as OpenCV
    rounds it, the 4-neighbour Laplacian with reflected borders (OpenCV's default). It agrees with
    that function on the same uint8 images to about 1e-3 (OpenCV's fixed-point grey conversion)."""
    with torch.no_grad():
        u8 = ((x.float() + 1) * 127.5).round().clamp(0, 255)
        grey = (0.299 * u8[:, 0] + 0.587 * u8[:, 1] + 0.114 * u8[:, 2]).round().unsqueeze(1)
        k = grey.new_tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
        return F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="reflect"), k).abs().mean((1, 2, 3))


class DegradationEmbedding(nn.Module):
    """The modulation's offset from the degraded input's log-sharpness ℓ (B,) (ours): sinusoidal
    features of ℓ at `n` frequencies, then a two-layer MLP to the timestep embedding's width, added to
    it. Its last layer starts at zero, so at initialisation the model is the one without it."""

    def __init__(self, dim: int, n: int = 8):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(n, dtype=torch.float32) / 4, persistent=False)
        self.inp = nn.Linear(2 * n, dim)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, log_s: torch.Tensor) -> torch.Tensor:
        x = log_s.view(-1, 1) * self.freqs.to(log_s)
        return self.out(F.silu(self.inp(torch.cat([torch.sin(x), torch.cos(x)], -1))))
