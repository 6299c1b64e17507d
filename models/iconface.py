"""IConFace around diffusers' `Flux2Transformer2DModel` (IConFace, arXiv:2605.02814, and its supplement).

The transformer is imported, never forked. `IConFace.forward` re-implements only the short top-level
loop of `Flux2Transformer2DModel.forward` — embedders, modulation, the stock blocks called as they
are, output layers — so that IConFace's parts can sit around the blocks:

* **Token packing** (supplement, "Token packing and RoPE"): the hybrid concat sequence
  x_in = [x_scene; x_deg; x_ref] (paper eq. 2) with four-axis ids (t, h, w, l): scene t = 0, degraded
  t = 2, reference r at t = 10 + r, text (0, 0, 0, l). Without references the reference segment is
  removed (no placeholders).
* **Mixed reference counts** are handled by *masking*: the batch is padded to its largest reference
  count and the padded references' keys are masked in every attention. Masked keys contribute exactly
  nothing, so each sample's scene output equals its unpadded forward (tests check it), while one
  batch keeps one static shape — simpler and faster than regrouping a batch by count.
* **Global identity pathway** (eqs. 3–5): e_r = z_r/‖z_r‖, q_r = ‖z_r‖, w = softmax(log q / T),
  e_ref = Norm(Σ w_r e_r); without references the degraded image's own embedding (weak conditioning).
  h_id = φ_global(e_id); Δ_dbl, Δ_sgl = ψ_dbl(h_id), ψ_sgl(h_id) are added to the IMAGE modulation of
  the double blocks and, per token with zero rows on text, to the single blocks' modulation.
* **Degraded structure pathway** (eqs. 6–7): a low-rank input residual s_deg·W_in(x_deg) on the scene
  tokens; two learned-query poolers to the memory (base route on x_deg, detail route on
  x_deg − smooth(x_deg), smooth = 3×3 box average over the token grid with replicate borders); after
  every block a low-rank cross-attention from the scene tokens to the memory, h' = h + γ_ℓ·Attn(…),
  with γ_ℓ initialised to zero.

Every addition is zero-initialised (ψ's, W_in's up-projection, the gates), so at initialisation the
output equals the stock diffusers forward exactly.

* **Degraded readout** (ours; on only for randomly initialised backbones trained with the `x0_residual`
  parameterisation, `pipelines.network.degraded_readout`): the output head reads h_scene + h_deg, the final hidden state of
  each scene token plus that of the degraded token at the same grid position. Near σ = 1 a scene token
  is pure noise, and a random backbone has no learned position-aligned attention to fetch the
  degraded evidence, so it learns nothing there in a CPU budget (docs/results.md). A pretrained FLUX.2 already attends across its in-context tokens: klein
  keeps the paper's scene-only head.
* **Reference readout** (ours; `train.reference_readout`, auto = on where the degraded readout is): the head also reads Δ = mean_r g([LN(h_scene + h_deg); LN(h_ref,r)]) at every grid
  position, over the kept tokens of the references at that position (`ReferenceReadout`; g a two-layer
  MLP whose last layer starts at zero). The reason is the degraded readout's: a random backbone learns no
  position-aligned attention to the references in a CPU budget, so in-context references alone change
  next to nothing there (docs/results.md). The
  references still enter the joint attention of eq. 2 as the paper has them; g only gives the head the
  aligned reference evidence, and it sees the degraded token beside it, so it can learn what to take
  (identity traits) and what not (the reference's pose, expression, lighting). Padded and RefSTAR-masked
  reference tokens contribute nothing; without references Δ = 0. A pretrained FLUX.2 attends across
  its in-context tokens: klein keeps the paper's head.
* **Degradation embedding** (ours; `train.degradation_embed`, on in the default): the timestep embedding,
  and so every block's modulation and the output norm, also reads the degraded input's log-sharpness
  (`DegradationEmbedding`, zero-initialised; the statistic is the reference gate's,
  pipelines.reference_gate), so one checkpoint can learn to lean on the references for a blurred photo
  and to leave a sharp one as it is.
* **Degradation-removal front end** (ours, `FrontEnd`; DiffBIR's stage 1): a small residual CNN
  trained beforehand by L2 (stage `train_front`), frozen; the model conditions on its output.
* **Composite conditioning** (`IConFaceConfig.conditioning = "composite"`, seed 002, models.composite):
  the references enter as Composite Context tokens appended to the prompt (their keys masked where a
  slot is padded or a component dropped) instead of in-context latents and the identity modulation;
  the degraded tokens and the structure pathway stay as `variant` sets them.
* **RefSTAR's transfer** (RefSTAR, arXiv:2507.10470; models.refstar; off by default): `Conditioning.ref_tokens`
  masks reference tokens in conflict regions out of every attention, like padding; `reference_route:
  decoupled` replaces the joint softmax of every block by eq. 4 (the reference attended separately and
  added), with per-block reference K/V adapters (`dca`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from types import MethodType
from typing import Literal

import torch
from diffusers import Flux2Transformer2DModel
from torch import nn

from models.checkpointing import CHECKPOINT_POLICIES, checkpoint, checkpointed_forward
from models.pathways import (
    DegradationEmbedding,
    FrontEnd,
    IdentityPathway,
    LowRankResidual,
    MemoryCrossAttention,
    QueryPooler,
    ReferenceReadout,
    identity_anchor,
    pack,
    smooth_tokens,
    unpack,
)

Variant = Literal["concat", "+struct", "+id", "single_route", "full"]
VARIANTS: dict[str, dict[str, bool]] = {
    # Paper Table 3, cumulative: concat only; + input residual; + identity modulation; + one memory
    # route with block-wise cross-attention; full = two routes (base + detail).
    "concat": {"residual": False, "identity": False, "memory": False, "two_routes": False},
    "+struct": {"residual": True, "identity": False, "memory": False, "two_routes": False},
    "+id": {"residual": True, "identity": True, "memory": False, "two_routes": False},
    "single_route": {"residual": True, "identity": True, "memory": True, "two_routes": False},
    "full": {"residual": True, "identity": True, "memory": True, "two_routes": True},
}

T_SCENE, T_DEG, T_REF0 = 0, 2, 10
ROUTES = ("in_context", "decoupled")  # how the scene reads the reference tokens (models.refstar)
CONDITIONINGS = ("iconface", "composite")


# ==================================================================================================
# Backbone configs
# ==================================================================================================

BACKBONES: dict[str, dict] = {
    # a tiny model that builds and trains on CPU (head dim 16 = sum of axes_dims_rope).
    "tiny": dict(
        patch_size=1,
        in_channels=48,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=96,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000,
        guidance_embeds=False,
    ),
    # The embedded default's training config: wide enough (inner dim 256) to carry 192-channel pixel
    # tokens (8x8 patches) — a hidden size below the token size cannot pass the noise through.
    "small": dict(
        patch_size=1,
        in_channels=192,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=8,
        joint_attention_dim=128,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(8, 8, 8, 8),
        rope_theta=2000,
        guidance_embeds=False,
    ),
    # FLUX.2-klein-base-4B (3,875,544,576 parameters).
    "klein_base_4b": dict(
        patch_size=1,
        in_channels=128,
        num_layers=5,
        num_single_layers=20,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=7680,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32),
        rope_theta=2000,
        guidance_embeds=False,
    ),
}


def build_backbone(name: str, weights: str | None = None, **overrides) -> Flux2Transformer2DModel:
    """The transformer from a named config (random init) or from a local diffusers folder `weights`."""
    if weights:
        from pathlib import Path

        if not Path(weights).exists():
            raise FileNotFoundError(
                f"backbone weights {weights} not found (a local diffusers transformer folder)"
            )
        return Flux2Transformer2DModel.from_pretrained(weights, local_files_only=True)
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    return Flux2Transformer2DModel(**{**BACKBONES[name], **overrides})


# ==================================================================================================
# Token packing
# ==================================================================================================


def grid_ids(t: int, h: int, w: int, device=None) -> torch.Tensor:
    """Ids (H·W, 4) = (t, y, x, 0) for one latent grid."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([torch.full_like(ys, t), ys, xs, torch.zeros_like(ys)], -1).reshape(-1, 4)


def text_ids(length: int, device=None) -> torch.Tensor:
    """Ids (L, 4) = (0, 0, 0, l)."""
    ids = torch.zeros(length, 4, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


# ==================================================================================================
# The model
# ==================================================================================================


@dataclass(frozen=True)
class IConFaceConfig:
    variant: Variant = "full"
    id_dim: int = 512
    temperature: float = 1.0  # T in eq. 4
    s_deg: float = 1.0  # eq. 6
    residual_rank: int = 16
    memory_tokens: int = 256  # in total; split evenly between the two routes in `full`
    memory_heads: int = 4
    xattn_rank: int = 16
    max_refs: int = 3
    deg_readout: bool = False  # ours (module docstring); the paper's head reads the scene tokens only
    ref_readout: bool = False  # ours (module docstring, "Reference readout"); off for pretrained backbones
    front_end: int = 0  # ours: width of the degradation-removal front end (FrontEnd); 0 = off (the paper)
    conditioning: str = "iconface"  # iconface (paper 001) | composite (seed 002's Composite Context)
    # RefSTAR (models.refstar): in_context = one joint attention over [scene; deg; refs] (its eq. 3, the
    # paper's IConFace); decoupled = eq. 4 in every block, with rank-`decoupled_rank` reference K/V
    # adapters and the scale λ = decoupled_scale
    reference_route: str = "in_context"
    decoupled_scale: float = 1.0
    decoupled_rank: int = 16
    # ours: the modulation also reads the degraded input's sharpness (DegradationEmbedding), so that one
    # model can act differently on mildly and severely degraded photos; False = the paper
    degradation_embed: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown IConFace variant {self.variant!r}; valid: {', '.join(VARIANTS)}")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {self.conditioning!r}; valid: {', '.join(CONDITIONINGS)}")
        if self.reference_route not in ROUTES:
            raise ValueError(f"unknown reference route {self.reference_route!r}; valid: {', '.join(ROUTES)}")
        if self.reference_route == "decoupled" and self.conditioning == "composite":
            raise ValueError(
                "the decoupled route reads in-context reference tokens; composite conditioning has none"
            )


@dataclass
class Conditioning:
    """Everything but the noisy scene: the model's inputs for one batch.

    deg (B, C, H, W) latents of the degraded image; refs (B, R, C, H, W) latents of up to R references
    with ref_mask (B, R) bool (R may be 0); z_refs (B, R, 512) and z_deg (B, 512) raw identity
    embeddings; text (B, L, joint_dim) the cached prompt embedding.
    Composite conditioning only: ref_images (B, R, 3, H, W) the references in [-1, 1] (its general
    encoder reads pixels); ctx_drop (B, 2) bool, per sample the dropped identity token / general tokens
    (classifier-free-guidance training), None = nothing dropped.
    """

    deg: torch.Tensor
    refs: torch.Tensor
    ref_mask: torch.Tensor
    z_refs: torch.Tensor
    z_deg: torch.Tensor
    text: torch.Tensor
    ref_images: torch.Tensor | None = None
    ctx_drop: torch.Tensor | None = None
    # RefSTAR (models.refstar.token_keep): (B, R, h·w) bool, False = a reference token in a conflict or
    # ignore region, masked as a key everywhere like a padded reference; None = every token kept
    ref_tokens: torch.Tensor | None = None
    # (B,) weight of the reference readout's Δ per sample (pipelines.reference_gate); None = 1
    ref_scale: torch.Tensor | None = None
    # (B,) log of the degraded input's sharpness (sharpness_tensor), read by the
    # degradation embedding where the model has one (IConFaceConfig.degradation_embed); None otherwise
    degradation: torch.Tensor | None = None
    # (reference slots in use, every one of them real in every sample), read from ref_mask once by
    # `with_layout` so that a sampling loop asks the device nothing per step; None = read per forward
    layout: tuple[int, bool] | None = None


def with_layout(cond: Conditioning) -> Conditioning:
    """`cond` with its reference layout read once (one host synchronisation instead of one per forward)."""
    r = cond.refs.shape[1] if cond.refs.ndim == 5 and bool(cond.ref_mask.any()) else 0
    return replace(cond, layout=(r, bool(cond.ref_mask[:, :r].all()) if r else True))


def stack_conditionings(a: Conditioning, b: Conditioning) -> Conditioning:
    """One conditioning for the batch [a; b] (both branches of classifier-free guidance in one forward):
    every tensor concatenated on the batch axis; the layout is the union of both."""
    out = {}
    for f in fields(Conditioning):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "layout":
            continue
        if (x is None) != (y is None):
            raise ValueError(f"stack_conditionings: {f.name} is set in one branch only")
        out[f.name] = None if x is None else torch.cat([x, y], 0)
    return with_layout(Conditioning(**out))


class IConFace(nn.Module):
    """IConFace: the transformer (frozen but for LoRA) plus the identity and structure pathways."""

    def __init__(
        self,
        transformer: Flux2Transformer2DModel,
        cfg: IConFaceConfig = IConFaceConfig(),
        composite: nn.Module | None = None,
    ):
        """`composite`: a models.composite.CompositeContext, required by (and only by)
        cfg.conditioning == "composite"; it replaces the in-context references and the identity pathway."""
        super().__init__()
        self.transformer = transformer
        self.cfg = cfg
        self.parts = VARIANTS[cfg.variant]
        if (cfg.conditioning == "composite") != (composite is not None):
            raise ValueError(
                f"conditioning {cfg.conditioning!r} "
                + ("needs a CompositeContext" if composite is None else "takes no CompositeContext")
            )
        self.composite = composite
        if composite is not None:
            self.parts = {**self.parts, "identity": False}  # the context's identity token replaces eqs. 3-5
        dim = transformer.inner_dim
        channels = transformer.config.in_channels
        n_blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
        self.residual = (
            LowRankResidual(channels, cfg.residual_rank, cfg.s_deg) if self.parts["residual"] else None
        )
        self.identity = IdentityPathway(cfg.id_dim, dim) if self.parts["identity"] else None
        self.front = FrontEnd(cfg.front_end) if cfg.front_end else None
        self.ref_fuse = ReferenceReadout(dim) if cfg.ref_readout else None
        self.deg_embed = DegradationEmbedding(dim) if cfg.degradation_embed else None
        if self.parts["memory"]:
            if self.parts["two_routes"]:
                self.pool_base = QueryPooler(dim, cfg.memory_tokens // 2, cfg.memory_heads)
                self.pool_detail = QueryPooler(
                    dim, cfg.memory_tokens - cfg.memory_tokens // 2, cfg.memory_heads
                )
            else:
                self.pool_base = QueryPooler(dim, cfg.memory_tokens, cfg.memory_heads)
                self.pool_detail = None
            self.xattn = nn.ModuleList(MemoryCrossAttention(dim, cfg.xattn_rank) for _ in range(n_blocks))
        else:
            self.pool_base = self.pool_detail = None
            self.xattn = None
        self.compiled = False  # compile_blocks() ran
        self.n_checkpointed = (
            n_blocks  # blocks under gradient checkpointing when it is on (checkpoint_blocks)
        )
        self.checkpoint_inside = False  # the compiled blocks checkpoint themselves (compile_blocks)
        self.checkpoint_policy = "full"  # what a checkpointed block keeps (checkpoint_blocks)
        self.dca = None  # RefSTAR's decoupled cross-attention (eq. 4): reference K/V adapters per block
        if cfg.reference_route == "decoupled":
            from models.refstar import install_decoupled

            self.dca = install_decoupled(transformer, cfg.decoupled_rank)

    def adapt_pathways(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pathway weights saved by another variant, made to fit this one where a part changes shape (a
        fine-tune from the default: models.lora.load_shared). `single_route` from `full`: the one memory
        route takes both routes' queries, base then detail, in the order eq. 7 concatenates their
        tokens; the detail route's attention and its high-pass are what is removed."""
        q_base, q_detail = state.get("pool_base.queries"), state.get("pool_detail.queries")
        if self.pool_base is None or self.pool_detail is not None or q_base is None or q_detail is None:
            return state
        joined = torch.cat([q_base, q_detail], 0)
        if joined.shape != self.pool_base.queries.shape:
            return state
        return {**{k: v for k, v in state.items() if k != "pool_detail.queries"}, "pool_base.queries": joined}

    def pathway_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters that are ours (not LoRA): pathways, poolers, cross-attentions."""
        return [p for n, p in self.named_parameters() if not n.startswith("transformer.")]

    def forward(
        self, scene: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, use_text: bool = True
    ) -> torch.Tensor:
        """Velocity û (B, C, H, W) for the noisy scene latents `scene` (B, C, H, W) at noise level σ (B,).

        `use_text=False` replaces the prompt by zeros of the same length (the empty-prompt branch of
        classifier-free guidance uses the cached empty-prompt embedding instead: pass it as cond.text).
        """
        tr = self.transformer
        b, c, h, w = scene.shape
        dev = scene.device
        n_img = h * w
        if cond.layout is None:
            r = cond.refs.shape[1] if cond.refs.ndim == 5 and bool(cond.ref_mask.any()) else 0
            all_real = bool(cond.ref_mask[:, :r].all()) if r else True
        else:
            r, all_real = cond.layout
        r_ctx = 0
        if self.composite is not None:
            r_ctx, r = r, 0  # seed 002: the references enter as context tokens (below), not as latents

        # ---- token packing (eq. 2): [scene; deg; refs], ids per segment -----------------------------
        x_scene = pack(scene)  # (B, HW, C)
        x_deg = pack(cond.deg)  # (B, HW, C)
        if self.residual is not None:
            x_scene = x_scene + self.residual(x_deg)  # eq. 6
        segs = [x_scene, x_deg]
        ids = [grid_ids(T_SCENE, h, w, dev), grid_ids(T_DEG, h, w, dev)]
        for i in range(r):
            segs.append(pack(cond.refs[:, i]))
            ids.append(grid_ids(T_REF0 + i, h, w, dev))
        x = torch.cat(segs, 1)  # (B, L_img, C)
        img_ids = torch.cat(ids, 0)  # (L_img, 4)
        txt = cond.text if use_text else torch.zeros_like(cond.text)
        txt_keep = None
        if r_ctx:
            txt, txt_keep = self._append_composite(txt, cond, r_ctx)
        n_txt = txt.shape[1]

        attn_kwargs = self._key_mask(cond, r, all_real, txt_keep, n_txt, n_img, x.shape[1])

        # ---- stock embedders and modulation (as Flux2Transformer2DModel.forward) ---------------------
        temb, mod_img, mod_txt, mod_single = self._modulation(sigma, cond, r, n_txt, x)
        hs = tr.x_embedder(x)  # (B, L_img, D)
        ehs = tr.context_embedder(txt)  # (B, L_txt, D)
        img_rot = tr.pos_embed(img_ids)
        txt_rot = tr.pos_embed(text_ids(n_txt, dev))
        rotary = (torch.cat([txt_rot[0], img_rot[0]], 0), torch.cat([txt_rot[1], img_rot[1]], 0))

        memory = None
        if self.pool_base is not None:
            deg_h = hs[:, n_img : 2 * n_img]  # the degraded tokens in hidden space
            memory = self.pool_base(deg_h)  # (B, M_b, D)
            if self.pool_detail is not None:
                memory = torch.cat([memory, self.pool_detail(deg_h - smooth_tokens(deg_h, h, w))], 1)  # eq. 7

        # ---- blocks --------------------------------------------------------------------------------
        hs = self._blocks(hs, ehs, (mod_img, mod_txt, mod_single), rotary, attn_kwargs, memory, n_txt, n_img)
        scene_h = self._readout(hs, cond, r, n_txt, n_img)
        out = tr.proj_out(tr.norm_out(scene_h, temb))  # (B, HW, C)
        return unpack(out, h, w)

    def _key_mask(self, cond, r, all_real, txt_keep, n_txt, n_img, n_tokens) -> dict | None:
        """The attention's key mask for padded references, masked context tokens and (RefSTAR) masked
        reference tokens ((B, 1, 1, L_txt + L_img), True = attend), RefSTAR's decoupled split, or None
        when every key is attended."""
        b, dev = cond.deg.shape[0], cond.deg.device
        attn_kwargs = None
        tok = cond.ref_tokens
        decoupled = r and self.cfg.reference_route == "decoupled"
        if (
            (r and not all_real)
            or txt_keep is not None
            or decoupled
            or (r and tok is not None and not bool(tok[:, :r].all()))
        ):
            keep = torch.ones(b, n_txt + n_tokens, dtype=torch.bool, device=dev)
            if txt_keep is not None:
                keep[:, :n_txt] = txt_keep
            for i in range(r):
                s = n_txt + (2 + i) * n_img
                ok = cond.ref_mask[:, i : i + 1]  # (B, 1)
                keep[:, s : s + n_img] = ok if tok is None else ok & tok[:, i]
            attn_kwargs = {"attention_mask": keep[:, None, None, :]}
            if decoupled:  # eq. 4 replaces the joint softmax (models.refstar.decoupled_attention)
                from models.refstar import RefSplit

                s0 = n_txt + 2 * n_img
                attn_kwargs = {"ref_split": RefSplit(s0, s0 + r * n_img, keep, self.cfg.decoupled_scale)}
        return attn_kwargs

    def _modulation(self, sigma, cond, r, n_txt, x):
        """(temb, double-stream image and text modulation, single-stream modulation): the stock
        embedders, plus the identity pathway's offsets on the image tokens (eq. 4)."""
        tr = self.transformer
        timestep = sigma.to(x.dtype) * 1000
        temb = tr.time_guidance_embed(timestep, None)  # (B, D)
        if self.deg_embed is not None:
            if cond.degradation is None:
                raise ValueError(
                    "this model reads the degraded input's sharpness (degradation_embed): "
                    "Conditioning.degradation is missing"
                )
            temb = temb + self.deg_embed(cond.degradation.to(temb))
        mod_img = tr.double_stream_modulation_img(temb)  # (B, 6D)
        mod_txt = tr.double_stream_modulation_txt(temb)  # (B, 6D)
        mod_single = tr.single_stream_modulation(temb)  # (B, 3D)
        if self.identity is not None:
            e_id = identity_anchor(
                cond.z_refs[:, :r] if r else cond.z_refs[:, :0],
                cond.ref_mask[:, :r],
                cond.z_deg,
                self.cfg.temperature,
            )
            d_dbl, d_sgl = self.identity(e_id)  # (B, 6D), (B, 3D)
            mod_img = mod_img + d_dbl  # image stream only
            is_img = torch.zeros(1, n_txt + x.shape[1], 1, dtype=x.dtype, device=x.device)
            is_img[:, n_txt:] = 1
            mod_single = (
                mod_single.unsqueeze(1) + d_sgl.unsqueeze(1) * is_img
            )  # (B, L, 3D), zero rows on text
        return temb, mod_img, mod_txt, mod_single

    def _blocks(self, hs, ehs, mods, rotary, attn_kwargs, memory, n_txt, n_img) -> torch.Tensor:
        """The double-stream then the single-stream blocks (with the memory cross-attention after each,
        eq. 7, when built); the joint hidden states (B, L_txt + L_img, D)."""
        tr = self.transformer
        mod_img, mod_txt, mod_single = mods
        k = 0
        for block in tr.transformer_blocks:
            ehs, hs = self._run(k, block, hs, ehs, mod_img, mod_txt, rotary, attn_kwargs)
            if memory is not None:
                hs = torch.cat([self.xattn[k](hs[:, :n_img], memory), hs[:, n_img:]], 1)
            k += 1
        hs = torch.cat([ehs, hs], 1)  # (B, L_txt + L_img, D)
        for block in tr.single_transformer_blocks:
            hs = self._run_single(k, block, hs, mod_single, rotary, attn_kwargs)
            if memory is not None:
                s = n_txt
                hs = torch.cat(
                    [hs[:, :s], self.xattn[k](hs[:, s : s + n_img], memory), hs[:, s + n_img :]], 1
                )
            k += 1
        return hs

    def _readout(self, hs, cond, r, n_txt, n_img) -> torch.Tensor:
        """The head's input at the scene tokens: their hidden states, plus the aligned degraded tokens'
        (degraded readout) and the references' evidence (reference readout) where built."""
        tok = cond.ref_tokens
        scene_h = hs[:, n_txt : n_txt + n_img]  # scene tokens only
        if self.cfg.deg_readout:
            scene_h = scene_h + hs[:, n_txt + n_img : n_txt + 2 * n_img]  # + the aligned degraded tokens
        if self.ref_fuse is not None and r:  # + the aligned references' evidence (ours)
            s0 = n_txt + 2 * n_img
            h_refs = hs[:, s0 : s0 + r * n_img].unflatten(1, (r, n_img))  # (B, R, HW, D)
            keep = cond.ref_mask[:, :r, None].expand(-1, -1, n_img)
            if tok is not None:
                keep = keep & tok[:, :r]
            delta = self.ref_fuse(scene_h, h_refs, keep)
            if cond.ref_scale is not None:
                delta = delta * cond.ref_scale.to(delta.dtype).view(-1, 1, 1)
            scene_h = scene_h + delta
        return scene_h

    def _append_composite(
        self, txt: torch.Tensor, cond: Conditioning, r: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt + composite context (B, L_txt + r·(1+T), joint_dim), its key mask or None when every
        token is kept): seed 002's eq. 1 for the first r reference slots, after the prompt."""
        if cond.ref_images is None:
            raise ValueError("composite conditioning needs Conditioning.ref_images (the reference pixels)")
        ctx, keep = self.composite(
            cond.z_refs[:, :r], cond.ref_images[:, :r], cond.ref_mask[:, :r], cond.ctx_drop
        )
        txt = torch.cat([txt, ctx.to(txt.dtype)], 1)
        if bool(keep.all()):
            return txt, None
        prompt = torch.ones(txt.shape[0], txt.shape[1] - ctx.shape[1], dtype=torch.bool, device=txt.device)
        return txt, torch.cat([prompt, keep], 1)

    def blocks(self) -> list[nn.Module]:
        """The transformer's blocks in forward order (double-stream, then single-stream)."""
        tr = self.transformer
        return [*tr.transformer_blocks, *tr.single_transformer_blocks]

    def checkpoint_blocks(self, fraction: float = 1.0, policy: str = "full") -> None:
        """Gradient checkpointing on the first ceil(fraction · n) blocks in forward order (1: every block,
        the recipe's memory; less trades memory for the recomputation the other blocks skip). Call before
        `compile_blocks`; the transformer's gradient checkpointing must be on.

        policy `full` keeps a block's inputs only and recomputes the whole block in the backward. The
        others are selective activation checkpointing: `save_matmuls` also keeps the outputs of its
        matrix products and attention (`models.checkpointing`) and recomputes only what lies
        between them (norms, modulation, rotary embedding, activations, casts); `save_attention` keeps
        the attention outputs only (a few MiB per block) and recomputes the rest. All give the
        gradients of no checkpointing."""
        if not 0 < fraction <= 1:
            raise ValueError(f"checkpoint fraction must lie in (0, 1], got {fraction}")
        if policy not in CHECKPOINT_POLICIES:
            raise ValueError(f"checkpoint policy must be one of {CHECKPOINT_POLICIES}, got {policy!r}")
        self.checkpoint_policy = policy
        if self.compiled:
            raise RuntimeError(
                "checkpoint_blocks after compile_blocks: the compiled blocks are already built"
            )
        self.n_checkpointed = math.ceil(fraction * len(self.blocks()))

    def compile_blocks(self) -> None:
        """`torch.compile` every block in place (regional compilation: the module tree and state-dict keys
        do not change, and the blocks of one kind share one compiled graph).

        With gradient checkpointing on, the checkpoint goes *inside* the compiled region: each checkpointed
        block's forward becomes `checkpoint(forward)` and the compiled function traces it, so one graph holds
        the forward and the recomputation of its backward (the order torchtitan uses: activation
        checkpointing applied first, `torch.compile` per block over it). The reverse order, a checkpoint
        around a compiled block, recomputes through a compiled region from inside autograd; it crashed on
        an H200 and is not built. Idempotent."""
        if self.compiled:
            return
        inside = bool(self.transformer.gradient_checkpointing)
        for k, block in enumerate(self.blocks()):
            if inside and k < self.n_checkpointed:
                block.forward = MethodType(checkpointed_forward(self.checkpoint_policy), block)
            block.compile()
        self.compiled, self.checkpoint_inside = True, inside

    def _run(self, k, block, hs, ehs, mod_img, mod_txt, rotary, attn_kwargs):
        if self._outer_checkpoint(k):
            return checkpoint(
                block, hs, ehs, mod_img, mod_txt, rotary, attn_kwargs, policy=self.checkpoint_policy
            )
        return block(hs, ehs, mod_img, mod_txt, rotary, attn_kwargs)

    def _run_single(self, k, block, hs, mod, rotary, attn_kwargs):
        if self._outer_checkpoint(k):
            return checkpoint(block, hs, None, mod, rotary, attn_kwargs, policy=self.checkpoint_policy)
        return block(hs, None, mod, rotary, attn_kwargs)

    def _outer_checkpoint(self, k: int) -> bool:
        """Checkpoint around block k's call: eager blocks with gradient checkpointing, while training."""
        return (
            torch.is_grad_enabled()
            and self.transformer.gradient_checkpointing
            and not self.checkpoint_inside
            and k < self.n_checkpointed
        )


def stock_forward(
    tr: Flux2Transformer2DModel, scene: torch.Tensor, sigma: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """The unmodified diffusers forward on IConFace's token layout (for equivalence tests)."""
    b, c, h, w = scene.shape
    r = cond.refs.shape[1] if cond.refs.ndim == 5 and cond.ref_mask.any() else 0
    segs = [pack(scene), pack(cond.deg)] + [pack(cond.refs[:, i]) for i in range(r)]
    ids = [grid_ids(T_SCENE, h, w), grid_ids(T_DEG, h, w)] + [grid_ids(T_REF0 + i, h, w) for i in range(r)]
    out = tr(
        hidden_states=torch.cat(segs, 1),
        encoder_hidden_states=cond.text,
        timestep=sigma,
        img_ids=torch.cat(ids, 0),
        txt_ids=text_ids(cond.text.shape[1]),
        return_dict=False,
    )[0]
    return unpack(out[:, : h * w], h, w)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
