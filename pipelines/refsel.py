"""The RefSel bootstrap loop's library: pairs from shards, training, prediction, confidence, report.

RefSTAR's data engine (Yin et al., arXiv:2507.10470, §"Data Engine"): annotate a few pairs by hand, train a
U-Net, predict masks for the rest, route doubtful ones back to people, keep the accepted ones. The
network input is [degraded target, reference] (eq. 1); the degraded target is drawn once per pair from
(seed, pair key, epoch) with the configured preset, so every run sees the same inputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from models.refsel import (
    CLASSES,
    MASK_CONFLICT,
    MASK_IGNORE,
    RefSelConfig,
    RefSelUNet,
    mask_to_target,
    ohem_cross_entropy,
    probs_to_mask,
)
from models.safetensors_io import save_file
from pipelines.degradations import degrade
from pipelines.shards import decode_sample, iter_raw, shard_paths


@dataclass
class Pair:
    """One target–reference pair of the shards."""

    key: str  # "<target>__<reference>" (the Label Studio task key)
    target: str
    reference: str
    split: str
    ref_index: int
    gt: np.ndarray  # (H, W, 3) uint8
    ref: np.ndarray
    truth: np.ndarray | None  # the shards' mask (synthetic ground truth) or None
    truth_provenance: str | None
    kinds: list[str]  # conflict types of the pair (synthetic source), [] otherwise


def pair_key(target: str, reference: str) -> str:
    return f"{target}__{reference}"


def pair_content(p: Pair) -> str:
    """A digest of the pixels an annotator sees for a pair (target and reference): an annotation is bound
    to it, so when the shards are rendered again and a pair key names other pixels, the old annotation
    is recognised as drawn on other images instead of being applied to the new ones."""
    h = hashlib.sha256()
    for img in (p.gt, p.ref):
        a = np.ascontiguousarray(img)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def iter_pairs(shards: str | Path, split: str) -> Iterator[Pair]:
    for raw in iter_raw(shard_paths(shards, split)):
        s = decode_sample(raw)
        meta = s["meta"]
        prov = meta.get("mask_provenance") or []
        kinds = meta.get("conflict_types") or []
        for i, (rid, ref) in enumerate(zip(meta["refs"], s["refs"])):
            yield Pair(
                pair_key(meta["target"], rid),
                meta["target"],
                rid,
                split,
                i,
                s["gt"],
                ref,
                s["masks"][i],
                prov[i] if i < len(prov) else None,
                kinds[i] if i < len(kinds) else [],
            )


def select_pool(keys: list[str], n: int, seed: int) -> list[str]:
    """The first n keys in a seeded hash order: growing n appends pairs, never reshuffles the pool."""
    rank = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}|{k}".encode()).hexdigest())
    return sorted(rank[:n])


def degraded_target(pair: Pair, preset: str, seed: int) -> np.ndarray:
    return degrade(pair.gt, preset, seed, pair.key, 0).image


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


# ---- model files ------------------------------------------------------------------------------------


def model_version(path: str | Path) -> str:
    h = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return f"refsel-{h[:12]}"


def save_model(model: RefSelUNet, path: str | Path, extra: dict | None = None) -> str:
    meta = {"config": json.dumps(asdict(model.cfg)), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)
    return model_version(path)


def load_model(path: str | Path) -> RefSelUNet:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RefSel model {path} does not exist")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path} is not a refsel model (no config in its safetensors metadata)")
    cfg = json.loads(meta["config"])
    model = RefSelUNet(RefSelConfig(widths=tuple(cfg["widths"]), in_channels=cfg["in_channels"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


# ---- training and prediction ------------------------------------------------------------------------


def train(
    lq: torch.Tensor,
    ref: torch.Tensor,
    masks: torch.Tensor,
    cfg,
    progress: bool = True,
) -> tuple[RefSelUNet, list[float]]:
    """Train a fresh U-Net on (lq, ref, contract masks) with OHEM-CE (eq. 2); returns (model, loss per epoch).

    Augmentation: a horizontal flip of all three together (faces are near-symmetric; the pair stays
    aligned because both images flip).

    Bit-reproducible for a given thread count (`torch.set_num_threads`, the stage's `refsel.threads`):
    CPU reductions split by thread, so another count gives other (equally good) weights.
    """
    torch.manual_seed(cfg.seed)
    model = RefSelUNet(RefSelConfig(widths=tuple(cfg.widths)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    target = mask_to_target(masks)
    g = torch.Generator().manual_seed(cfg.seed)
    n = lq.shape[0]
    history = []
    bar = tqdm(range(cfg.epochs), desc="refsel train", unit="epoch", disable=not progress)
    for _ in bar:
        perm = torch.randperm(n, generator=g, device=g.device)
        total, count = 0.0, 0
        model.train()
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            a, b, t = lq[idx], ref[idx], target[idx]
            flip = torch.rand(len(idx), generator=g, device=g.device) < 0.5
            a, b, t = (torch.where(flip.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x) for x in (a, b, t))
            loss = ohem_cross_entropy(model(a, b), t, cfg.ohem_thresh, cfg.ohem_min_kept)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
            count += len(idx)
        history.append(total / max(count, 1))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    return model.eval(), history


@torch.no_grad()
def predict(model: RefSelUNet, lq: torch.Tensor, ref: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Class probabilities (N, 3, H, W)."""
    model.eval()
    out = [
        model(lq[i : i + batch_size], ref[i : i + batch_size]).softmax(1)
        for i in range(0, len(lq), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, len(CLASSES), *lq.shape[-2:])


def confidence(probs: torch.Tensor) -> torch.Tensor:
    """Per pair: the mean over pixels of the top class probability (1 = certain everywhere)."""
    return probs.max(1).values.flatten(1).mean(1)


# ---- report ------------------------------------------------------------------------------------------


def scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Pixel accuracy (consistent vs conflict on the truth's face pixels) and conflict IoU/precision/recall."""
    valid = truth != MASK_IGNORE
    p, t = pred == MASK_CONFLICT, truth == MASK_CONFLICT
    inter, union = (p & t & valid).sum(), ((p | t) & valid).sum()
    return {
        "accuracy": float((p[valid] == t[valid]).mean()) if valid.any() else 1.0,
        "iou": 1.0 if union == 0 else float(inter / union),
        "tp": int(inter),
        "fp": int((p & ~t & valid).sum()),
        "fn": int((~p & t & valid).sum()),
        "ignore_accuracy": float(((pred == MASK_IGNORE) == (truth == MASK_IGNORE)).mean()),
    }


def per_type_report(pairs: list[Pair], preds: np.ndarray) -> dict:
    """RefSTAR Table 3 layout: accuracy per conflict scenario (mouth, eyes, glasses, beard, none), on
    pairs with a ground-truth mask. A pair with several conflict types counts in each of them."""
    groups: dict[str, list[dict]] = {}
    for p, m in zip(pairs, preds):
        if p.truth is None:
            continue
        s = scores(m, p.truth)
        for kind in p.kinds or ["none"]:
            groups.setdefault(kind, []).append(s)
        groups.setdefault("all", []).append(s)
    out = {}
    for kind, ss in sorted(groups.items()):
        tp, fp, fn = (sum(s[k] for s in ss) for k in ("tp", "fp", "fn"))
        out[kind] = {
            "pairs": len(ss),
            "accuracy": round(float(np.mean([s["accuracy"] for s in ss])), 4),
            "conflict_iou": round(tp / max(tp + fp + fn, 1), 4),
            "conflict_precision": round(tp / max(tp + fp, 1), 4),
            "conflict_recall": round(tp / max(tp + fn, 1), 4),
            "ignore_accuracy": round(float(np.mean([s["ignore_accuracy"] for s in ss])), 4),
        }
    return out


def predicted_masks(probs: torch.Tensor) -> np.ndarray:
    return probs_to_mask(probs).numpy()
