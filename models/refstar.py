"""RefSTAR's reference transfer as pure torch parts (RefSTAR, arXiv:2507.10470, §"Reference Transfer in
Restoration Model" and §"Mask-Compatible Cycle-Consistency Loss").

* **Conflict masks at token resolution** (`consistent_region`, `token_keep`). A conflict mask by the
  contract (0 consistent, 1 conflict, 255 ignore) gives RefSTAR's binary M: 1 where the reference may
  be transferred (consistent), 0 on conflicts AND on ignore (background, hair: "all the backgrounds
  and hair are masked", §Data Engine). Pooling rule (ours: the paper masks ReferenceNet features and
  gives no rule): M is average-pooled to the latent token grid (8×8 pixel patches on the CPU default,
  16×16 pixels per FLUX.2 VAE token) and a reference token is KEPT when at least `keep` (default 0.5)
  of its pixels are consistent. A dropped token is excluded as a key from every attention, exactly as
  a padded reference is (models.iconface), so its content cannot reach any other token.
* **Decoupled cross-attention** (eq. 4). The in-context route of IConFace is eq. 3: one softmax over
  the keys of the input and of the references together, where Q_in·K_refᵀ can be driven to 0 and the
  reference ignored. Eq. 4 takes two softmaxes and adds them:

      σ(Q_in K_inᵀ/√d) V_in + λ · σ(Q_in K_refᵀ/√d) V_ref

  so that the reference's share cannot be squeezed out by the input's keys. Here it replaces the joint
  attention of EVERY block (double and single; the paper puts DCA in each attention layer its
  ReferenceNet feeds). The reference tokens stay in the sequence and run through the same blocks (a
  ReferenceNet that shares the backbone's weights), but they attend only to reference keys, so the
  reference features do not depend on the degraded input, as a ReferenceNet's do not. λ is
  `decoupled_scale` (eq. 4 has none, i.e. 1; IP-Adapter's λ, 1 in training).
  New trainable parameters (`RefKV`, one per block): IP-Adapter's separate key/value projections for
  the image prompt (W'_k, W'_v), as a rank-r residual on the block's own (LoRA-adapted) projections,
  K_ref = W_k h + U_k D h, V_ref = W_v h + U_v D h, with U zero at the start (so the route starts from
  the shared projections). Ours: low-rank instead of full copies (full copies are 2·D² per block,
  472 M parameters on klein-4B); rank 0 = shared projections only.
* **Mask-Compatible Cycle-Consistency Loss** (eq. 5) and the total (eq. 7):

      L_cycle = Σ_i λ_i ℓ_i(M ⊙ I_out^Ref, M ⊙ I^Ref),   λ_1 = 1, λ_perc = 0.8, λ_id = 1.2
      L = λ_GT L_GT + λ_cycle L_cycle,                     λ_GT = 1, λ_cycle = 1.5

  I_out^Ref is the restoration of the DEGRADED reference with the model's output as its reference.
  ℓ_1 is the mean absolute difference over all pixels and channels (M ⊙ zeroes the rest, so the value
  is the literal formula's); ℓ_id = 1 − cos(A(M⊙I_out^Ref), sg(A(M⊙I^Ref))) with the frozen identity
  encoder A; ℓ_perc is LPIPS when its weights are configured (else the term is off). M ⊙ multiplies
  the [-1, 1] images, so masked pixels are 0 (mid-grey) in both images: whatever the output holds
  there, every term is unchanged. L_GT is IConFace's loss (supplement eq. 1), not the paper's eq. 6.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MASK_CONSISTENT = 0  # the contract's value for "may be transferred" (models.refsel)


# ==================================================================================================
# Masks
# ==================================================================================================


def consistent_region(mask: torch.Tensor) -> torch.Tensor:
    """RefSTAR's M from contract masks (…, H, W) uint8 {0, 1, 255}: 1.0 where consistent (0), else 0.0."""
    return (mask == MASK_CONSISTENT).float()


def token_keep(consistent: torch.Tensor, grid: tuple[int, int], keep: float = 0.5) -> torch.Tensor:
    """Reference tokens to keep (B, R, h·w) bool from M (B, R, H, W) in {0, 1} on a token grid (h, w).

    A token is kept when the consistent fraction of its pixels (average pooling of M onto the grid) is at
    least `keep`; the order is the row-major token order of models.iconface.pack.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must lie in (0, 1], got {keep}")
    b, r, hh, ww = consistent.shape
    if r == 0:
        return torch.zeros(b, 0, grid[0] * grid[1], dtype=torch.bool, device=consistent.device)
    pooled = F.adaptive_avg_pool2d(consistent.reshape(b * r, 1, hh, ww).float(), grid)  # (B·R, 1, h, w)
    return (pooled >= keep - 1e-6).reshape(b, r, grid[0] * grid[1])


# ==================================================================================================
# Decoupled cross-attention (eq. 4)
# ==================================================================================================


@dataclass
class RefSplit:
    """One forward's layout for the decoupled processors: the reference tokens are the contiguous
    segment [start, end) of the joint sequence (text first, as the blocks see it); keep (B, L) bool over
    the whole sequence (False: a padded reference or a masked reference token); scale λ of eq. 4."""

    start: int
    end: int
    keep: torch.Tensor
    scale: float = 1.0


class RefKV(nn.Module):
    """Low-rank residual key/value projections of the reference tokens (IP-Adapter's W'_k, W'_v):
    h (B, L, D) → (ΔK, ΔV) (B, L, inner); the up-projections start at zero."""

    def __init__(self, dim: int, inner: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up_k = nn.Linear(rank, inner, bias=False)
        self.up_v = nn.Linear(rank, inner, bias=False)
        nn.init.zeros_(self.up_k.weight)
        nn.init.zeros_(self.up_v.weight)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.down(h)
        return self.up_k(d), self.up_v(d)


def _split(x: torch.Tensor, s: RefSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens outside the reference segment, the segment) along dim 1."""
    return torch.cat([x[:, : s.start], x[:, s.end :]], 1), x[:, s.start : s.end]


def decoupled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: RefSplit) -> torch.Tensor:
    """Eq. 4 for a joint sequence: q, k, v (B, L, H, d) (diffusers' layout, after norm and RoPE) → (B, L, H, d).

    Input tokens (everything outside [start, end)): σ(Q_in K_inᵀ)V_in + λ·σ(Q_in K_refᵀ)V_ref over the kept
    reference keys. Reference tokens: σ(Q_ref K_refᵀ)V_ref over the kept reference keys only. A sample with
    no kept reference key gets 0 for both reference terms (no NaN from an empty softmax).
    """
    t = lambda x: x.transpose(1, 2)  # noqa: E731  (B, H, L, d)
    q_in, q_ref = _split(q, s)
    k_in, k_ref = _split(k, s)
    v_in, v_ref = _split(v, s)
    keep = s.keep[:, s.start : s.end]  # (B, L_ref)
    has = keep.any(1)  # (B,)
    mask = (keep | ~has[:, None])[:, None, None, :]  # (B, 1, 1, L_ref); an empty row attends to all, then × 0
    gate = has.to(q.dtype)[:, None, None, None]
    a_in = F.scaled_dot_product_attention(t(q_in), t(k_in), t(v_in))  # (B, H, L_in, d)
    a_ref = F.scaled_dot_product_attention(t(q_in), t(k_ref), t(v_ref), attn_mask=mask)
    a_rr = F.scaled_dot_product_attention(t(q_ref), t(k_ref), t(v_ref), attn_mask=mask)
    out_in = t(a_in + s.scale * gate * a_ref)  # (B, L_in, H, d)
    out_ref = t(a_rr * gate)
    return torch.cat([out_in[:, : s.start], out_ref, out_in[:, s.start :]], 1)


def _add_ref_kv(
    key: torch.Tensor, value: torch.Tensor, h_ref: torch.Tensor, start: int, end: int, adapter: RefKV | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """key, value (B, L, inner) with the adapter's ΔK, ΔV added on the reference segment [start, end)."""
    if adapter is None:
        return key, value
    dk, dv = adapter(h_ref)
    pad = lambda d, x: torch.cat([x[:, :start], x[:, start:end] + d, x[:, end:]], 1)  # noqa: E731
    return pad(dk, key), pad(dv, value)


class DecoupledAttnProcessor:
    """Double-block attention (diffusers `Flux2Attention`) with eq. 4 when given `ref_split`; the stock
    `Flux2AttnProcessor` otherwise (no references in the batch)."""

    def __init__(self, adapter: RefKV | None):
        from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor

        self.adapter = adapter
        self.stock = Flux2AttnProcessor()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
        ref_split: RefSplit | None = None,
    ):
        if ref_split is None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

        n_txt = encoder_hidden_states.shape[1]
        s = ref_split
        query, key, value, e_q, e_k, e_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        a, b = s.start - n_txt, s.end - n_txt  # the segment within the image stream
        key, value = _add_ref_kv(key, value, hidden_states[:, a:b], a, b, self.adapter)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        e_q, e_k, e_v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (e_q, e_k, e_v))
        e_q, e_k = attn.norm_added_q(e_q), attn.norm_added_k(e_k)
        query, key, value = (torch.cat([e, x], 1) for e, x in ((e_q, query), (e_k, key), (e_v, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        hs = decoupled_attention(query, key, value, s).flatten(2, 3).to(query.dtype)
        enc, hs = hs[:, :n_txt], hs[:, n_txt:]
        return attn.to_out[1](attn.to_out[0](hs)), attn.to_add_out(enc)


class DecoupledParallelAttnProcessor:
    """Single-block attention (diffusers `Flux2ParallelSelfAttention`, fused QKV + MLP) with eq. 4 when
    given `ref_split`; the stock `Flux2ParallelSelfAttnProcessor` otherwise."""

    def __init__(self, adapter: RefKV | None):
        from diffusers.models.transformers.transformer_flux2 import Flux2ParallelSelfAttnProcessor

        self.adapter = adapter
        self.stock = Flux2ParallelSelfAttnProcessor()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
        ref_split: RefSplit | None = None,
    ):
        if ref_split is None:
            return self.stock(attn, hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        s = ref_split
        h = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        qkv, mlp = torch.split(h, [qkv_dim, h.shape[-1] - qkv_dim], dim=-1)
        query, key, value = qkv.chunk(3, dim=-1)
        key, value = _add_ref_kv(key, value, hidden_states[:, s.start : s.end], s.start, s.end, self.adapter)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        hs = decoupled_attention(query, key, value, s).flatten(2, 3).to(query.dtype)
        return attn.to_out(torch.cat([hs, attn.mlp_act_fn(mlp)], dim=-1))


def install_decoupled(transformer, rank: int) -> nn.ModuleList:
    """Set the decoupled processors on every block of a `Flux2Transformer2DModel`; returns the new
    trainable `RefKV` adapters (one per block, double blocks first; empty with rank 0) for the caller
    to own as a submodule (the processors only reference them)."""
    dim = transformer.inner_dim
    adapters = nn.ModuleList()
    for block in transformer.transformer_blocks:
        ad = RefKV(dim, block.attn.inner_dim, rank) if rank else None
        block.attn.set_processor(DecoupledAttnProcessor(ad))
        adapters.extend([ad] if ad is not None else [])
    for block in transformer.single_transformer_blocks:
        ad = RefKV(dim, block.attn.inner_dim, rank) if rank else None
        block.attn.set_processor(DecoupledParallelAttnProcessor(ad))
        adapters.extend([ad] if ad is not None else [])
    return adapters


# ==================================================================================================
# Mask-Compatible Cycle-Consistency Loss (eq. 5) and the total (eq. 7)
# ==================================================================================================


@dataclass(frozen=True)
class CycleWeights:
    """λ's of eq. 5 (λ_1, λ_id, λ_perc as published) and eq. 7 (λ_GT, λ_cycle)."""

    l1: float = 1.0
    identity: float = 1.2
    perceptual: float = 0.8
    gt: float = 1.0
    cycle: float = 1.5


def cycle_loss(
    out: torch.Tensor,
    ref: torch.Tensor,
    consistent: torch.Tensor,
    w: CycleWeights = CycleWeights(),
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
    perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Eq. 5 per sample: {"cycle", "cycle_l1", "cycle_id", "cycle_perc"}, each (B,).

    out = I_out^Ref (the restored degraded reference), ref = I^Ref, both (B, 3, H, W) in [-1, 1];
    consistent = M (B, H, W) in {0, 1}. `embed`: images in [-1, 1] → raw identity embeddings (B, D) (the
    frozen encoder; None = no identity term); `perceptual`: (x, y) → (B,) (LPIPS; None = off). The target
    side carries no gradient.
    """
    m = consistent.to(out.dtype)[:, None]  # (B, 1, H, W)
    mo, mr = m * out, (m * ref).detach()
    l1 = (mo - mr).abs().flatten(1).mean(1)  # (B,)
    zero = torch.zeros_like(l1)
    ident = perc = zero
    if embed is not None and w.identity:
        with torch.no_grad():
            e_ref = F.normalize(embed(mr), dim=-1)
        ident = 1 - F.cosine_similarity(embed(mo), e_ref, dim=-1)
    if perceptual is not None and w.perceptual:
        perc = perceptual(mo, mr)
    total = w.l1 * l1 + w.identity * ident + w.perceptual * perc
    return {"cycle": total, "cycle_l1": l1, "cycle_id": ident, "cycle_perc": perc}


def total_loss(l_gt: torch.Tensor, l_cycle: torch.Tensor, w: CycleWeights = CycleWeights()) -> torch.Tensor:
    """Eq. 7: λ_GT · L_GT + λ_cycle · L_cycle."""
    return w.gt * l_gt + w.cycle * l_cycle
