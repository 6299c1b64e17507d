"""Validation of a training run: the fixed validation batch, and PSNR / identity similarity of the
restorations with and without references (`evaluate`, per target for paired intervals)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.id_encoder import raw_embedding
from pipelines.batches import Batch, make_batch, to_uint8
from pipelines.config import TrainConfig
from pipelines.degradations import get_preset
from pipelines.module import IConFaceModule
from pipelines.shards import iter_samples


def psnr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-image PSNR (B,) of images in [-1, 1], on the 0–255 scale after rounding to 8 bits."""
    from pipelines.evaluation import psnr_u8

    return psnr_u8(to_uint8(a), to_uint8(b))


def validation_batch(shards: str, cfg: TrainConfig, max_refs: int) -> Batch:
    """The first `val_samples` val targets, degraded once with `val_preset` (seed 42 + index), with
    their first protocol references (up to max_refs) in max_refs slots."""
    samples = []
    for i, s in enumerate(iter_samples(shards, "val")):
        if i >= cfg.val_samples:
            break
        lq, _ = get_preset(cfg.val_preset)(s["gt"], np.random.default_rng(42 + i))
        samples.append((s, lq))
    if not samples:
        raise ValueError(f"{shards} has no val samples to validate on")
    masks = cfg.refstar.reference_masks != "none"  # RefSTAR: the shards' masks, as in training
    return make_batch(
        [lq for _, lq in samples],
        [s["refs"][:max_refs] for s, _ in samples],
        [s["ref_emb"][:max_refs] for s, _ in samples],
        dim=samples[0][0]["gt_emb"].shape[-1],
        slots=max_refs,
        gt=[s["gt"] for s, _ in samples],
        z_gt=[s["gt_emb"] for s, _ in samples],
        keys=[s["key"] for s, _ in samples],
        ref_masks=[s["masks"][:max_refs] for s, _ in samples] if masks else None,
    )


def no_refs(batch: Batch) -> Batch:
    b, _, c, h, w = batch["refs"].shape
    return {
        **batch,
        "refs": torch.zeros(b, 0, c, h, w),
        "ref_mask": torch.zeros(b, 0, dtype=torch.bool),
        "z_refs": torch.zeros(b, 0, batch["z_refs"].shape[-1]),
    }


@torch.no_grad()
def evaluate(
    module: IConFaceModule, batch: Batch, evaluator, steps: int, guidance: float = 4.0
) -> tuple[dict, dict]:
    """PSNR and identity similarity (evaluator encoder with the module's crop, cosine to the target) of
    the degraded input and of the restoration with references and without: (means, outputs), the
    outputs holding the restorations and the per-target values (`per_target`, for paired intervals)."""

    def unit(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(
            raw_embedding(evaluator.eval(), (x.clamp(-1, 1) + 1) / 2, module.crop_border), dim=-1
        )

    g = unit(batch["gt"])

    def idsim(x: torch.Tensor) -> np.ndarray:
        return (unit(x) * g).sum(-1).numpy()

    out_ref = module.restore(batch, steps=steps, guidance=guidance)
    out_none = module.restore(no_refs(batch), steps=steps, guidance=guidance)
    per = {
        "lq_psnr": psnr(batch["lq"], batch["gt"]),
        "restored_psnr": psnr(out_ref, batch["gt"]),
        "restored_noref_psnr": psnr(out_none, batch["gt"]),
        "lq_id_sim": idsim(batch["lq"]),
        "restored_id_sim": idsim(out_ref),
        "restored_noref_id_sim": idsim(out_none),
    }
    m = {k: round(float(np.mean(v)), 4) for k, v in per.items()}
    return m, {"ref": out_ref, "none": out_none, "per_target": per}
