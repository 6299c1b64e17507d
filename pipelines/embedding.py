"""Identity embeddings for every manifest image: raw vectors (direction · norm), batched."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from models.id_encoder import IRBackbone, load_adaface_checkpoint, load_encoder, preprocess
from pipelines.config import EmbedConfig
from pipelines.images import load_rgb, sha256_file


def load_identity_encoder(kind: str, checkpoint: str) -> tuple[IRBackbone, str, str]:
    """(model in eval mode, encoder name, checkpoint sha256) for `small_ir` or `adaface_ir50`."""
    if kind == "small_ir":
        model, name = load_encoder(checkpoint)
    elif kind == "adaface_ir50":
        model, name = load_adaface_checkpoint(checkpoint), "adaface_ir50"
    else:
        raise ValueError(f"unknown identity encoder {kind!r}; valid: small_ir, adaface_ir50")
    return model, name, sha256_file(checkpoint)


@dataclass(frozen=True)
class Encoders:
    """The frozen identity encoders of training and evaluation, and the crop they are used with.

    `primary` (embed.encoder: AdaFace in the recipe) conditions and trains the model; `evaluator` (an
    independent encoder, ArcFace's role) measures it, or the primary where there is none: `fallback`
    then says so, and every caller prints it.
    """

    primary: IRBackbone
    evaluator: IRBackbone
    name: str
    crop_border: float
    fallback: str | None = None


class DlibEvaluator(torch.nn.Module):
    """dlib's face ResNet (pipelines.faces.DlibResNet) behind the identity encoders' interface: it takes
    `preprocess`'s input (BGR in [-1, 1] at `cfg.input_size`) and returns (unit embedding, norm), so every
    caller of an evaluator (evaluate, the training's validation, fit) uses it unchanged. No gradients."""

    def __init__(self, folder: str | None = None, input_size: int = 128):
        super().__init__()
        from types import SimpleNamespace

        from pipelines.faces import DlibResNet

        self.net = DlibResNet(folder)
        self.cfg = SimpleNamespace(input_size=input_size, embedding_dim=128)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rgb = ((x.flip(1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        z = torch.from_numpy(np.stack([self.net.describe(img) for img in rgb]))
        norm = z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return z / norm, norm


def load_encoders(ecfg: EmbedConfig, encoders_dir: str | Path | None) -> Encoders:
    """The `embed` section's primary encoder and `<encoders_dir>/evaluator.safetensors` (else the primary,
    with a printed note)."""
    primary, name, _ = load_identity_encoder(ecfg.encoder, ecfg.checkpoint)
    if ecfg.evaluator == "dlib_resnet":
        return Encoders(primary, DlibEvaluator(ecfg.face_models), name, ecfg.crop_border)
    ev = Path(encoders_dir) / "evaluator.safetensors" if encoders_dir else None
    if ev is not None and ev.is_file():
        return Encoders(primary, load_identity_encoder("small_ir", str(ev))[0], name, ecfg.crop_border)
    note = f"no evaluator encoder at {ev}; the primary encoder ({name}) measures identity instead"
    print(f"note: {note}")
    return Encoders(primary, primary, name, ecfg.crop_border, note)


def encoder_input(img: np.ndarray, size: int, border: float) -> np.ndarray:
    """Crop `border` of each edge, then area-resize to (size, size): (H, W, 3) uint8 → (size, size, 3)."""
    if border > 0:
        h, w = img.shape[:2]
        bh, bw = round(h * border), round(w * border)
        img = img[bh : h - bh, bw : w - bw]
    if img.shape[0] != size or img.shape[1] != size:
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BOX))
    return img


@torch.no_grad()
def embed_paths(model: IRBackbone, paths: list[str], cfg: EmbedConfig, progress: bool = True) -> np.ndarray:
    """Raw embeddings (N, D) float32 of the images at `paths`, in order."""
    torch.set_num_threads(cfg.threads)
    model.eval()
    size = model.cfg.input_size
    out = []
    for i in tqdm(range(0, len(paths), cfg.batch_size), desc="embed", unit="batch", disable=not progress):
        batch = np.stack(
            [encoder_input(load_rgb(p)[0], size, cfg.crop_border) for p in paths[i : i + cfg.batch_size]]
        )
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, S, S) RGB [0, 1]
        e, n = model(preprocess(x, size))
        out.append((e * n).numpy().astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, model.cfg.embedding_dim), np.float32)
