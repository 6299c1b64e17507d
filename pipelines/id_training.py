"""Train the small identity encoders of the embedded default, and measure face verification.

The encoders stand in for AdaFace / ArcFace: they are trained on a pool of synthetic identities
that is disjoint from the album the dataset is built from (as AdaFace is trained on WebFace, not on
FFHQ), with the AdaFace loss. Verification accuracy is measured on identities held out of training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from models.id_encoder import AdaFaceHead, IRBackbone, IRConfig, preprocess
from pipelines.config import EncoderArch, TrainIdEncoderConfig


@dataclass
class FaceSet:
    """Images (N, H, W, 3) uint8 with integer identity labels (N,)."""

    images: np.ndarray
    labels: np.ndarray


def split_identities(labels: np.ndarray, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, held out) over samples, splitting whole identities (deterministic)."""
    ids = np.unique(labels)
    rng = np.random.default_rng(seed)
    held = set(rng.choice(ids, size=max(2, round(len(ids) * holdout_fraction)), replace=False).tolist())
    hold = np.array([lab in held for lab in labels])
    return ~hold, hold


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mild training augmentation of RGB [0, 1] (B, 3, S, S): shift, low resolution, noise.

    No flips and no strong colour changes: mark positions and colours are identity traits.
    """
    b, _, s, _ = x.shape
    # Random shift of up to 1/16 of the side (replicate padding).
    pad = max(1, s // 16)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=g, device=g.device)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=g, device=g.device)
    x = torch.stack([xp[i, :, oy[i] : oy[i] + s, ox[i] : ox[i] + s] for i in range(b)])
    # Low-resolution augmentation (AdaFace's low_res_augmentation) on a random 30 %.
    low = torch.rand(b, generator=g, device=g.device) < 0.3
    if low.any():
        f = float(torch.empty(1, device=g.device).uniform_(1.5, 3.0, generator=g))
        small = torch.nn.functional.interpolate(x[low], scale_factor=1 / f, mode="area")
        x[low] = torch.nn.functional.interpolate(small, size=(s, s), mode="bilinear", align_corners=False)
    noisy = torch.rand(b, generator=g, device=g.device) < 0.2
    if noisy.any():
        x[noisy] = (x[noisy] + torch.randn(x[noisy].shape, generator=g, device=g.device) * 0.03).clamp(0, 1)
    # Slight brightness change: lighting varies per photo.
    x = (x * (1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=g, device=g.device) - 0.5))).clamp(0, 1)
    return x


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def embed(model: IRBackbone, images: np.ndarray, batch_size: int = 256, border: float = 0.0) -> np.ndarray:
    """Raw embeddings (N, D) float32 (direction · norm) of (N, H, W, 3) uint8 RGB images."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = preprocess(to_tensor(images[i : i + batch_size]), model.cfg.input_size, border)
        e, n = model(x)
        out.append((e * n).numpy())
    return (
        np.concatenate(out).astype(np.float32) if out else np.zeros((0, model.cfg.embedding_dim), np.float32)
    )


def train_encoder(
    data: FaceSet, arch: EncoderArch, cfg: TrainIdEncoderConfig, progress: bool = True, desc: str = "encoder"
) -> tuple[IRBackbone, list[float]]:
    """Train an IR encoder with the AdaFace loss on `data`; returns the model (eval) and per-epoch losses."""
    torch.manual_seed(arch.seed)
    g = torch.Generator().manual_seed(arch.seed)
    model = IRBackbone(
        IRConfig(
            cfg.input_size,
            tuple(arch.units),
            tuple(arch.widths),
            cfg.embedding_dim,
            dropout=0.2,
            stem_stride=arch.stem_stride,
        )
    )
    classes, labels = np.unique(data.labels, return_inverse=True)
    head = AdaFaceHead(
        cfg.embedding_dim, len(classes), m=cfg.margin, h=cfg.h, s=cfg.scale, t_alpha=cfg.t_alpha
    )
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    x_all = to_tensor(data.images)
    y_all = torch.from_numpy(labels.astype(np.int64))
    n = len(x_all)
    steps = cfg.epochs * max(1, n // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    losses = []
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress)
    for _epoch in range(cfg.epochs):
        model.train()
        head.train()
        perm = torch.randperm(n, generator=g, device=g.device)
        tot, cnt = 0.0, 0
        for i in range(0, n - cfg.batch_size + 1, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            x = preprocess(_augment(x_all[idx].clone(), g), cfg.input_size)
            emb, norm = model(x)
            loss = head(emb, norm, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item()
            cnt += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        losses.append(tot / max(cnt, 1))
    bar.close()
    return model.eval(), losses


def verification(
    emb: np.ndarray, labels: np.ndarray, seed: int, folds: int = 10, link_cos: float = 0.6
) -> dict:
    """Face verification on all positive pairs and as many random negative pairs (balanced).

    Accuracy uses the LFW protocol (threshold chosen on 9 folds, measured on the 10th). Also the
    accuracy at the FFHQ-Ref link threshold (cosine similarity > `link_cos`), TAR at FAR = 1e-3 over
    all negative pairs, and the mean positive / negative similarities.
    """
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    sim = e @ e.T
    iu = np.triu_indices(len(e), 1)
    same = labels[iu[0]] == labels[iu[1]]
    s = sim[iu]
    pos, neg_all = s[same], s[~same]
    rng = np.random.default_rng(seed)
    neg = rng.choice(neg_all, size=min(len(pos), len(neg_all)), replace=False)
    scores = np.concatenate([pos, neg])
    truth = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
    order = rng.permutation(len(scores))
    scores, truth = scores[order], truth[order]
    fold_of = np.arange(len(scores)) % folds
    accs = []
    for k in range(folds):
        tr, te = fold_of != k, fold_of == k
        best = _best_threshold(scores[tr], truth[tr])
        accs.append(((scores[te] > best) == truth[te]).mean())
    far_thr = np.quantile(neg_all, 1 - 1e-3) if len(neg_all) else 1.0
    return {
        "verification_accuracy": float(np.mean(accs)),
        "accuracy_at_link_threshold": float(((scores > link_cos) == truth).mean()),
        "tar_at_far_1e-3": float((pos > far_thr).mean()) if len(pos) else 0.0,
        "mean_positive_cosine": float(pos.mean()) if len(pos) else 0.0,
        "mean_negative_cosine": float(neg_all.mean()) if len(neg_all) else 0.0,
        "positive_pairs": int(len(pos)),
        "negative_pairs": int(len(neg_all)),
    }


def _best_threshold(scores: np.ndarray, truth: np.ndarray) -> float:
    """Threshold maximising accuracy, by one sort (for many scores)."""
    o = np.argsort(scores)
    s, t = scores[o], truth[o]
    # Predict positive for scores > s[i]: correct = negatives at or below i + positives above i.
    neg_below = np.cumsum(~t)
    pos_above = t.sum() - np.cumsum(t)
    i = int(np.argmax(neg_below + pos_above))
    return float(s[i])


def load_pool(paths: Sequence[str], labels: Sequence[str]) -> FaceSet:
    """Read a list of images (RGB, validated) into a FaceSet with integer labels (sorted names)."""
    from pipelines.images import load_rgb

    names = sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    imgs = [load_rgb(p)[0] for p in paths]
    return FaceSet(np.stack(imgs), np.array([index[lab] for lab in labels], dtype=np.int64))
