"""Identity encoders: AdaFace's IR backbone (exact key layout) and a small IR-style variant.

`IRBackbone(input_size=112, units=(3, 4, 14, 3), widths=(64, 64, 128, 256, 512))` is AdaFace IR-50:
its `state_dict` keys are those of mk-minchul/AdaFace `net.Backbone` (``input_layer.*``,
``body.{i}.res_layer.*`` / ``body.{i}.shortcut_layer.*``, ``output_layer.{0,3,4}.*``), so the released
checkpoints load after stripping their ``model.`` prefix. The embedded default uses the same class
with fewer units and narrower widths at 64 px.

Input convention (both): (B, 3, S, S) **BGR** in [-1, 1], i.e. (x/255 − 0.5)/0.5 on BGR pixels;
`preprocess` converts RGB [0, 1] tensors. forward returns ``(embedding, norm)`` with `embedding`
L2-normalised (B, D) and `norm` (B, 1); the raw embedding is ``embedding * norm`` and the norm is the
quality proxy (AdaFace).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# ==================================================================================================
# Backbone
# ==================================================================================================


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


class BasicBlockIR(nn.Module):
    """AdaFace's `BasicBlockIR`: BN-Conv-BN-PReLU-Conv-BN residual, MaxPool(1, s) or 1×1 conv shortcut."""

    def __init__(self, in_channel: int, depth: int, stride: int):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channel, depth, (1, 1), stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, (3, 3), (1, 1), 1, bias=False),
            nn.BatchNorm2d(depth),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


@dataclass(frozen=True)
class IRConfig:
    input_size: int = 112
    units: tuple[int, ...] = (3, 4, 14, 3)
    widths: tuple[int, ...] = (64, 64, 128, 256, 512)  # stem, then one per stage
    embedding_dim: int = 512
    dropout: float = 0.4
    stem_stride: int = 1  # 1 in AdaFace; 2 halves the resolution early (small CPU variants)


IR50 = IRConfig()


class IRBackbone(nn.Module):
    """IR backbone; with the default config exactly AdaFace IR-50 (43.6 M parameters)."""

    def __init__(self, cfg: IRConfig = IR50):
        super().__init__()
        if len(cfg.units) != 4 or len(cfg.widths) != 5:
            raise ValueError(
                f"IRConfig needs 4 stage unit counts and 5 widths, got {cfg.units}, {cfg.widths}"
            )
        if cfg.input_size % (16 * cfg.stem_stride):
            raise ValueError(f"input_size must be a multiple of {16 * cfg.stem_stride}, got {cfg.input_size}")
        self.cfg = cfg
        w = cfg.widths
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, w[0], (3, 3), cfg.stem_stride, 1, bias=False), nn.BatchNorm2d(w[0]), nn.PReLU(w[0])
        )
        modules = []
        for stage, n in enumerate(cfg.units):
            cin, cout = w[stage], w[stage + 1]
            modules.append(BasicBlockIR(cin, cout, 2))
            modules += [BasicBlockIR(cout, cout, 1) for _ in range(n - 1)]
        self.body = nn.Sequential(*modules)
        side = cfg.input_size // (16 * cfg.stem_stride)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(w[4]),
            nn.Dropout(cfg.dropout),
            Flatten(),
            nn.Linear(w[4] * side * side, cfg.embedding_dim),
            nn.BatchNorm1d(cfg.embedding_dim, affine=False),
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, S, S) BGR in [-1, 1] → (embedding (B, D) unit norm, norm (B, 1))."""
        x = self.input_layer(x)  # (B, w0, S/k, S/k), k = stem_stride
        x = self.body(x)  # (B, w4, S/16k, S/16k)
        x = self.output_layer(x)  # (B, D)
        norm = torch.norm(x, 2, 1, True)  # (B, 1)
        return x / norm.clamp_min(1e-12), norm


def preprocess(rgb: torch.Tensor, size: int, border: float = 0.0) -> torch.Tensor:
    """RGB in [0, 1] (B, 3, H, W) → encoder input (B, 3, size, size), BGR in [-1, 1].

    `border` crops that fraction of the side on each edge first (FFHQ-Ref crops 1/16 of a 512 image
    before an area resize to 112). Differentiable, so the identity loss can backpropagate through it.
    """
    if border > 0:
        h, w = rgb.shape[-2:]
        bh, bw = round(h * border), round(w * border)
        rgb = rgb[..., bh : h - bh, bw : w - bw]
    if rgb.shape[-1] != size or rgb.shape[-2] != size:
        mode = "area" if rgb.shape[-1] > size else "bilinear"
        rgb = F.interpolate(
            rgb, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False})
        )
    bgr = rgb.flip(1)
    return (bgr - 0.5) / 0.5


def raw_embedding(model: IRBackbone, rgb: torch.Tensor, border: float = 0.0) -> torch.Tensor:
    """Raw identity embedding z = e·‖z‖ (B, D) of RGB images in [0, 1] (direction and norm kept)."""
    emb, norm = model(preprocess(rgb, model.cfg.input_size, border))
    return emb * norm


# ==================================================================================================
# AdaFace loss: the margin adapts to the feature norm (image quality)
# ==================================================================================================


class AdaFaceHead(nn.Module):
    """AdaFace margin head (Kim et al., CVPR 2022), as in the official `head.AdaFace`.

    With normalised feature norm ẑ = clip((‖z‖ − μ)/(σ/h), −1, 1) (μ, σ an EMA of the batch norms),
    the target logit becomes s·(cos(θ + g_angle) − g_add) with g_angle = −m·ẑ and g_add = m·ẑ + m.
    High-norm (high-quality) samples get an additive margin, low-norm ones an angular one.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        m: float = 0.4,
        h: float = 0.333,
        s: float = 64.0,
        t_alpha: float = 0.01,
    ):
        super().__init__()
        self.kernel = nn.Parameter(
            torch.empty(embedding_dim, num_classes).uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
        )
        self.m, self.h, self.s, self.t_alpha, self.eps = m, h, s, t_alpha, 1e-3
        self.register_buffer("batch_mean", torch.ones(1) * 20)
        self.register_buffer("batch_std", torch.ones(1) * 100)

    def forward(self, embeddings: torch.Tensor, norms: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """embeddings (B, D) unit norm, norms (B, 1), labels (B,) → cross-entropy loss (scalar)."""
        kernel = F.normalize(self.kernel, dim=0)
        cosine = (embeddings @ kernel).clamp(-1 + self.eps, 1 - self.eps)  # (B, C)
        safe = norms.clamp(0.001, 100).detach()
        if self.training:
            with torch.no_grad():
                mean, std = safe.mean(), safe.std()
                self.batch_mean.mul_(1 - self.t_alpha).add_(self.t_alpha * mean)
                self.batch_std.mul_(1 - self.t_alpha).add_(self.t_alpha * std)
        scaler = ((safe - self.batch_mean) / (self.batch_std + self.eps) * self.h).clamp(-1, 1)  # (B, 1)
        onehot = F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)
        g_angular = -self.m * scaler * onehot
        theta = torch.acos(cosine)
        cos_m = torch.cos((theta + g_angular).clamp(self.eps, math.pi - self.eps))
        g_add = (self.m + self.m * scaler) * onehot
        logits = (cos_m - g_add) * self.s
        return F.cross_entropy(logits, labels)


# ==================================================================================================
# Checkpoints
# ==================================================================================================


def load_adaface_checkpoint(path: str | Path, cfg: IRConfig = IR50) -> IRBackbone:
    """Load a released AdaFace checkpoint (``adaface_ir50_*.ckpt``) or a safetensors export of it.

    The .ckpt holds ``state_dict`` with backbone keys prefixed ``model.`` and head keys ``head.``; it is
    read with ``weights_only=True`` (argparse.Namespace hyper-parameters allowed). Returns the backbone
    in eval mode. Raises FileNotFoundError / ValueError naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"identity encoder checkpoint {path} not found (set embed.checkpoint to a local file)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle refusing a class, or a corrupt file
            raise ValueError(
                f"{path}: cannot load with weights_only=True ({exc}); convert it to safetensors "
                "(keys as in the official state_dict) and point embed.checkpoint at that file"
            ) from exc
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"{path}: no state_dict in checkpoint")
    backbone = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    if not backbone:  # a bare backbone state dict
        backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
    model = IRBackbone(cfg)
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: not an AdaFace IR checkpoint for {cfg}: missing {sorted(missing)[:5]}..., "
            f"unexpected {sorted(unexpected)[:5]}..."
        )
    return model.eval()


def save_encoder(model: IRBackbone, path: str | Path, name: str) -> None:
    """Save backbone weights (safetensors) with the architecture in the metadata."""
    import json

    from models.safetensors_io import save_file

    c = model.cfg
    meta = {
        "name": name,
        "config": json.dumps(
            {
                "input_size": c.input_size,
                "units": list(c.units),
                "widths": list(c.widths),
                "embedding_dim": c.embedding_dim,
                "dropout": c.dropout,
                "stem_stride": c.stem_stride,
            }
        ),
    }
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)


def load_encoder(path: str | Path) -> tuple[IRBackbone, str]:
    """Load an encoder saved by `save_encoder`; returns (model in eval mode, name)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"identity encoder {path} not found (run `dvc repro train_id_encoder`?)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path}: no architecture metadata; was it written by save_encoder?")
    c = json.loads(meta["config"])
    cfg = IRConfig(
        c["input_size"],
        tuple(c["units"]),
        tuple(c["widths"]),
        c["embedding_dim"],
        c["dropout"],
        c.get("stem_stride", 1),
    )
    model = IRBackbone(cfg)
    model.load_state_dict(load_file(str(path)))
    return model.eval(), meta.get("name", path.stem)
