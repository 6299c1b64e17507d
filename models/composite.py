"""Seed 002's Composite Context (Composite Context, arXiv:2505.21905, Sec. 3.1) as a conditioning of the same FLUX.2 model.

The reference face x_REF becomes a token sequence (eq. 1):

    c = Concat[W_H·φ_H(x_REF), W_G·φ_G(x_REF)] + e_position

* φ_H, the high-level identity embedding: the project's identity encoder (AdaFace IR-50 on the real
  path, the small IR encoder on the embedded default; the paper uses ArcFace R50). The shards and the
  restorer carry its raw embedding z_r; the token is W_H applied to its unit direction z_r/‖z_r‖ (ours: the
  norm is AdaFace's quality proxy, not identity, and it would set the token's scale).
* φ_G, the general face representation: FaRL ViT-B/16 (the paper; loaded from a local checkpoint in its
  official format, a CLIP ViT-B/16 state dict, and frozen as the paper freezes every pre-trained module),
  whose whole output sequence (1 + 196 = 197 tokens) is used. The sequence is the last transformer
  layer's output of every token after CLIP's `ln_post` (CLIP applies ln_post to the class token alone
  before its projection; the paper does not say which normalisation its 197 tokens carry: ours).
  On the embedded default there is no FaRL: `small` is the same CLIP vision tower at 64 px (8×8
  patches, width 64, 2 layers, 65 tokens), randomly initialised and **trained jointly** with the
  pathways (ours). A frozen random tower would hand W_G only random features of the patches; trained,
  it is a learned reference encoder, which is what a from-scratch CPU model can afford.
* W_H, W_G project to the context width of the transformer, `joint_attention_dim` (the dimension of
  the prompt embedding that FLUX.2's `context_embedder` takes: the analogue of the paper's
  "dimension of UNet cross-attention"); e_position is the sinusoidal encoding of Vaswani et al. over
  the 1 + T positions.

In the FLUX.2 model (models.iconface, `conditioning: composite`) the context tokens are appended to the
prompt in the text stream, so every block attends to them jointly (the analogue of the paper's
cross-attention); the reference latents are not packed in context and IConFace's identity modulation
(eqs. 3–5 of 001) is off — the composite context replaces both. Several references occupy consecutive
slots of 1 + T tokens each; a padded slot and a dropped component (classifier-free-guidance training,
"dropped through attention masking", Sec. 4) are removed by masking their keys, which is exactly
the forward without those tokens (tests check it).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ==================================================================================================
# CLIP vision tower (OpenAI CLIP's VisionTransformer, the FaRL backbone), exact key layout
# ==================================================================================================


@dataclass(frozen=True)
class ClipVisionConfig:
    input_resolution: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    output_dim: int | None = 512  # CLIP's `proj` (kept for a strict load; the tokens do not use it)


GENERAL_ENCODERS: dict[str, ClipVisionConfig] = {
    # FaRL-Base-Patch16 = CLIP ViT-B/16 (Zheng et al., CVPR 2022): 197 tokens of width 768.
    "farl_vit_b16": ClipVisionConfig(),
    # ours, the embedded default's stand-in (module docstring): 65 tokens of width 64, trained jointly.
    "small": ClipVisionConfig(64, 8, 64, 2, 4, None),
}


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """CLIP's pre-norm block: x + Attn(ln_1 x), then x + MLP(ln_2 x) (keys attn.*, ln_1, mlp.c_fc, ...)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, 4 * width)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(4 * width, width)),
                ]
            )
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ClipVisionTower(nn.Module):
    """CLIP's VisionTransformer with its state-dict names (conv1, class_embedding, positional_embedding,
    ln_pre, transformer.resblocks.{i}, ln_post, proj); `forward` returns the token sequence."""

    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        if cfg.input_resolution % cfg.patch_size:
            raise ValueError(
                f"input_resolution {cfg.input_resolution} is not a multiple of patch_size {cfg.patch_size}"
            )
        self.cfg = cfg
        w = cfg.width
        n = (cfg.input_resolution // cfg.patch_size) ** 2 + 1
        scale = w**-0.5
        self.conv1 = nn.Conv2d(3, w, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(n, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            ResidualAttentionBlock(w, cfg.heads) for _ in range(cfg.layers)
        )
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, cfg.output_dim)) if cfg.output_dim else None
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def width(self) -> int:
        return self.cfg.width

    @property
    def tokens(self) -> int:
        return (self.cfg.input_resolution // self.cfg.patch_size) ** 2 + 1

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) CLIP-normalised at S = input_resolution → tokens (B, 1 + (S/p)², W)."""
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # (B, (S/p)², W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + self.positional_embedding.to(x.dtype)  # (B, T, W)
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(x)  # (B, T, W): every token (module docstring)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) RGB in [-1, 1] → tokens (B, T, W): resized (bicubic, antialiased) to the
        tower's resolution and normalised with CLIP's mean and std (FaRL's preprocessing)."""
        s = self.cfg.input_resolution
        x = (images.clamp(-1, 1) + 1) / 2
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=True)
        return self((x - self.mean) / self.std)


def load_farl(tower: ClipVisionTower, path: str | Path) -> None:
    """Load a FaRL checkpoint (its official format: a pickled dict whose "state_dict" is the state dict of a whole
    CLIP ViT-B/16 whose image tower keys start with `visual.`) or a safetensors file of the same keys.

    Read with weights_only=True. Text-tower keys are ignored; a missing or misshapen image-tower key is an
    error naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"general encoder weights {path} not found (a local FaRL ViT-B/16 checkpoint)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # an unpickling error names a class the safe loader refuses
            raise ValueError(
                f"{path}: not loadable with weights_only=True ({exc.__class__.__name__}); save its "
                "`state_dict` as safetensors and point train.composite.general_encoder_weights at that file"
            ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(
            f"{path}: expected a state dict (or a dict with `state_dict`), got {type(state).__name__}"
        )
    visual = {k.split("visual.", 1)[1]: v for k, v in state.items() if "visual." in k}
    if not visual:
        raise ValueError(f"{path}: no `visual.*` keys: not a CLIP/FaRL checkpoint")
    own = tower.state_dict()
    missing = sorted(set(own) - set(visual))
    if missing:
        raise ValueError(f"{path}: image-tower keys missing for this config: {missing[:5]}")
    for k, v in own.items():
        if visual[k].shape != v.shape:
            raise ValueError(
                f"{path}: {k} has shape {tuple(visual[k].shape)}, the config needs {tuple(v.shape)}"
            )
    tower.load_state_dict({k: visual[k].float() for k in own})


# ==================================================================================================
# Composite Context (eq. 1)
# ==================================================================================================


def sinusoidal_positions(n: int, dim: int) -> torch.Tensor:
    """e_position (n, dim) of Vaswani et al.: PE(p, 2i) = sin(p / 10000^(2i/dim)), PE(p, 2i+1) = cos(·)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(0, dim, 2, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, i / dim)  # (n, ceil(dim/2))
    pe = torch.zeros(n, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return pe.float()


class CompositeContext(nn.Module):
    """c = Concat[W_H φ_H, W_G φ_G] + e_position per reference (eq. 1), as context tokens with a key mask.

    `encoder` is φ_G (a `ClipVisionTower`); φ_H's embeddings come in as raw vectors (z_refs).
    `train_encoder`: whether φ_G learns (ours, `small`) or stays frozen (FaRL, the paper).
    """

    def __init__(self, id_dim: int, ctx_dim: int, encoder: ClipVisionTower, train_encoder: bool):
        super().__init__()
        self.encoder = encoder
        self.train_encoder = train_encoder
        encoder.requires_grad_(train_encoder)
        self.w_h = nn.Linear(id_dim, ctx_dim)
        self.w_g = nn.Linear(encoder.width, ctx_dim)
        self.register_buffer("position", sinusoidal_positions(1 + encoder.tokens, ctx_dim), persistent=False)

    @property
    def tokens_per_reference(self) -> int:
        return 1 + self.encoder.tokens

    def forward(
        self,
        z_refs: torch.Tensor,
        ref_images: torch.Tensor,
        ref_mask: torch.Tensor,
        drop: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, R·(1+T), ctx_dim), keep (B, R·(1+T)) bool) for R reference slots.

        z_refs (B, R, D_id) raw identity embeddings, ref_images (B, R, 3, H, W) in [-1, 1], ref_mask (B, R)
        (False = padded slot: all its tokens masked), drop (B, 2) bool or None: per sample, whether the
        identity token (column 0) and the general tokens (column 1) are dropped (CFG training, Sec. 4).
        """
        b, r = ref_mask.shape
        e = F.normalize(z_refs, dim=-1)  # (B, R, D_id): the identity direction
        ident = self.w_h(e).unsqueeze(2)  # (B, R, 1, ctx)
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            g = self.encoder.encode(ref_images.flatten(0, 1))  # (B·R, T, W)
        general = self.w_g(g).unflatten(0, (b, r))  # (B, R, T, ctx)
        ctx = torch.cat([ident, general], 2) + self.position.to(general.dtype)  # (B, R, 1+T, ctx), eq. 1
        t = general.shape[2]
        keep_id = ref_mask.clone()
        keep_g = ref_mask.clone()
        if drop is not None:
            keep_id = keep_id & ~drop[:, :1]
            keep_g = keep_g & ~drop[:, 1:2]
        keep = torch.cat([keep_id.unsqueeze(2), keep_g.unsqueeze(2).expand(b, r, t)], 2)  # (B, R, 1+T)
        return ctx.flatten(1, 2), keep.flatten(1, 2)


def build_composite(encoder: str, weights: str | Path | None, id_dim: int, ctx_dim: int) -> CompositeContext:
    """The composite context for `encoder` (a `GENERAL_ENCODERS` name): FaRL loaded from `weights` and
    frozen; `small` random and trained. `weights` None with FaRL builds the architecture only (a bundle's
    pathway weights fill it)."""
    if encoder not in GENERAL_ENCODERS:
        raise ValueError(f"unknown general encoder {encoder!r}; valid: {', '.join(GENERAL_ENCODERS)}")
    tower = ClipVisionTower(GENERAL_ENCODERS[encoder])
    if weights is not None:
        load_farl(tower, weights)
    return CompositeContext(id_dim, ctx_dim, tower, train_encoder=encoder == "small")
