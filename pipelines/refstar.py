"""RefSTAR's transfer with masks in the training pipeline (arXiv:2507.10470; maths in models/refstar.py).

    train.refstar.reference_masks: refsel   train.shards: data/refsel/shards
    train.refstar.reference_route: decoupled
    train.refstar.cycle_loss: true

* **Masks in training.** With `refstar.reference_masks` not `none`, the batch builder (`training.collate`)
  takes each chosen reference's conflict mask from the shards (`refmask{i}.png`; the stream passes them
  through the Ray tasks untouched) and `make_batch` turns it into RefSTAR's M (`ref_consistent`, 1 =
  consistent). The module pools M to the token grid (`models.refstar.token_keep`) and masks the
  reference tokens in conflict regions out of every attention. `refsel` reads the refsel stage's shards
  (a person's annotation where one was painted, the RefSel U-Net's prediction elsewhere; provenance per
  mask in meta.json, counted by `mask_provenance`); `truth` (ours) reads the synthetic ground truth of
  data/shards, the oracle the RefSel model is measured against.
* **The cycle loss** (`add_cycle`, eq. 5 in eq. 7). After the step's prediction ẑ0 of the target, the
  model restores the DEGRADED first reference of each sample (degraded by the batch builder with the
  stream's preset, a pure function of (seed, key, reference, epoch)) with ẑ0 itself as its only
  reference, and the result is supervised by the clean reference on its consistent region M. The
  gradient reaches ẑ0 through the reference tokens (so the output must carry the reference's textures)
  and the network through both passes. ẑ0 enters as a latent (no decode/encode round trip); its identity
  embedding (the identity pathway's input) is taken without gradient. The paper's restorer is one-step;
  the flow-matching analogue of "the restoration" at training time is the one-step prediction ẑ0, which
  is what the target pass gives and what the cycle pass computes at σ = sigma_max (`cycle_sigma: max`,
  ours: at the step's σ the cycle's noisy input would hold (1 − σ)·I_Ref, the answer). Samples without a
  reference have no cycle term (0). Cost per step: benchmarks/bench_refstar.py.
* **Inference** (`predict_masks`): the RefSel U-Net predicts the masks from (degraded input, reference);
  no annotation is needed. `pipelines.restorer.Restorer` and `refface restore --ref-masks` use it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.refstar import CycleWeights, cycle_loss, token_keep, total_loss

MASK_OPTIONS = ("none", "refsel", "truth")

# Rows of the ablation table (pipelines/ablation.py) for RefSTAR's transfer, as train overrides; the masks are
# those of the shards ablate reads (data/shards: the synthetic ground truth). An explicit dict, no registry.
ABLATE_ROWS: dict[str, dict] = {
    "refstar_in_context": {"refstar.reference_route": "in_context", "refstar.cycle_loss": False},
    "refstar_decoupled": {"refstar.reference_route": "decoupled", "refstar.cycle_loss": False},
    "refstar_decoupled_cycle": {"refstar.reference_route": "decoupled", "refstar.cycle_loss": True},
}


@dataclass(frozen=True)
class RefstarSettings:
    """What the training module and the batch builder need of the `train` section's RefSTAR keys."""

    masks: bool = False
    token_keep: float = 0.5
    cycle: bool = False
    cycle_sigma: str = "max"
    weights: CycleWeights = field(default_factory=CycleWeights)

    @classmethod
    def from_config(cls, cfg) -> RefstarSettings:
        """From a TrainConfig (its `refstar` section)."""
        rs = cfg.refstar
        return cls(
            masks=rs.reference_masks != "none",
            token_keep=rs.mask_token_keep,
            cycle=rs.cycle_loss,
            cycle_sigma=rs.cycle_sigma,
            weights=CycleWeights(
                l1=rs.cycle_lambda_l1,
                identity=rs.cycle_lambda_id,
                perceptual=rs.cycle_lambda_perc if rs.cycle_lpips else 0.0,
                gt=rs.lambda_gt,
                cycle=rs.lambda_cycle,
            ),
        )


def ablate_overrides(name: str, mask_option: str) -> dict:
    """The train overrides of an ablation row of ABLATE_ROWS, with `mask_option` as the masks."""
    if name not in ABLATE_ROWS:
        raise ValueError(f"unknown RefSTAR row {name!r}; valid: {', '.join(ABLATE_ROWS)}")
    return {**ABLATE_ROWS[name], "refstar.reference_masks": mask_option}


# ==================================================================================================
# Data: masks from the shards, the degraded reference
# ==================================================================================================


def degrade_reference(
    ref: np.ndarray, preset: str, seed: int, key: str, ref_index: int, epoch: int
) -> np.ndarray:
    """The cycle's degraded reference (H, W, 3) uint8: `preset` drawn from (seed, "<key>/ref<i>", epoch),
    a draw of its own (the target's is keyed by `key` alone)."""
    from pipelines.degradations import degrade

    return degrade(ref, preset, seed, f"{key}/ref{ref_index}", epoch).image


def mask_provenance(shards: str | Path, option: str, split: str = "train") -> dict:
    """Check that `shards` hold the masks `option` asks for and count their provenance in `split`.

    refsel: the refsel stage's shards (index `mask_model`), every reference masked `annotated` or
    `predicted`; truth: every mask `synthetic`. Returns {"mask_model", "provenance": {kind: count}}; a
    mismatch raises ValueError naming the shards and what to set.
    """
    from pipelines.shards import iter_raw, shard_paths

    if option not in MASK_OPTIONS:
        raise ValueError(f"unknown reference_masks {option!r}; valid: {', '.join(MASK_OPTIONS)}")
    root = Path(shards)
    index = json.loads((root / "index.json").read_text())
    if option == "refsel" and not index.get("mask_model"):
        raise ValueError(
            f"train.refstar.reference_masks: refsel reads the refsel stage's shards (annotated or predicted masks); "
            f"{root} has no mask model in its index: set train.shards: data/refsel/shards"
        )
    want = {"refsel": {"annotated", "predicted"}, "truth": {"synthetic"}}.get(option, set())
    counts: Counter = Counter()
    for raw in iter_raw(shard_paths(root, split)):
        meta = json.loads(raw["meta.json"])
        prov = meta.get("mask_provenance") or []
        for i in range(meta["ref_count"]):
            kind = prov[i] if i < len(prov) else None
            if want and (kind not in want or f"refmask{i}.png" not in raw):
                raise ValueError(
                    f"{root}: sample {raw['__key__']} reference {i} has mask provenance {kind!r}; "
                    f"reference_masks: {option} needs {' or '.join(sorted(want))} masks on every reference"
                )
            counts[str(kind)] += 1
    return {"mask_model": index.get("mask_model"), "provenance": dict(sorted(counts.items()))}


# ==================================================================================================
# The cycle loss in a training step (eq. 5, eq. 7)
# ==================================================================================================


def load_perceptual(cfg) -> tuple[torch.nn.Module | None, str]:
    """LPIPS (alex, v0.1) for ℓ_perc of eq. 5 from `train.refstar.cycle_lpips` (+ heads), frozen; or (None, why)."""
    rs = cfg.refstar
    if not rs.cycle_lpips:
        return (
            None,
            "off: no local LPIPS weights (set train.refstar.cycle_lpips to torchvision's alexnet-owt-7be5be79.pth)",
        )
    from pipelines.iqa import load_lpips

    model = load_lpips(rs.cycle_lpips, "alex", rs.cycle_lpips_heads).eval().requires_grad_(False)
    return model, f"on: LPIPS alex from {rs.cycle_lpips}"


def add_cycle(module, batch: dict, x0_hat: torch.Tensor, sigma: torch.Tensor, terms: dict, g) -> dict:
    """The step's terms with eq. 7's total: `loss` = λ_GT·(IConFace loss) + λ_cycle·mean_B(L_cycle).

    `module` is the IConFaceModule (codec, front end, identity encoder, predict, text); `batch` holds
    refs (B, R, 3, H, W), ref_mask (B, R), ref_lq (B, 3, H, W) the degraded slot-0 reference and, with
    masks, ref_consistent (B, R, H, W) = M (else M = 1 everywhere: the plain cycle loss). New terms:
    gt (the IConFace loss), cycle, cycle_l1, cycle_id, cycle_perc (the last three averaged over the
    samples that have a reference).
    """
    rs: RefstarSettings = module.refstar
    b = x0_hat.shape[0]
    has = batch["ref_mask"][:, 0] if batch["ref_mask"].shape[1] else torch.zeros(b, dtype=torch.bool)
    idx = has.nonzero().flatten().to(x0_hat.device)
    per = {k: x0_hat.new_zeros(b) for k in ("cycle", "cycle_l1", "cycle_id", "cycle_perc")}
    if len(idx):
        if "ref_lq" not in batch:
            raise ValueError(
                "train.refstar.cycle_loss needs the degraded reference (batch['ref_lq']) from the batch builder"
            )
        ref = batch["refs"][idx, 0]  # I^Ref (n, 3, H, W)
        m = (
            batch["ref_consistent"][idx, 0] if "ref_consistent" in batch else torch.ones_like(ref[:, 0])
        )  # M (n, H, W)
        lq = module.clean(batch["ref_lq"][idx])
        deg = module.codec.encode(lq)  # (n, C, h, w)
        z_out = x0_hat[idx]  # the output as the new (only) reference, as a latent
        with torch.no_grad():
            z0 = module.codec.encode(ref)
            z_deg = module.identity(lq)
            z_ref = module.identity(module.codec.decode(z_out))
        tokens = (
            token_keep(m[:, None], tuple(deg.shape[-2:]), rs.token_keep)
            if "ref_consistent" in batch
            else None
        )
        from models.iconface import Conditioning

        cond = Conditioning(
            deg,
            z_out[:, None],
            torch.ones(len(idx), 1, dtype=torch.bool, device=deg.device),
            z_ref[:, None],
            z_deg,
            module.text.expand(len(idx), -1, -1),
            ref_tokens=tokens,
            degradation=module.degradation_of(batch["ref_lq"][idx]),  # the degraded reference's
        )
        from models.losses import add_noise

        s = sigma[idx] if rs.cycle_sigma == "train" else torch.full_like(sigma[idx], module.optim.sigma_max)
        noise = torch.randn(tuple(z0.shape), generator=g, device=g.device).to(z0)
        _, x0_ref = module.predict(add_noise(z0, noise, s), s, cond)
        out_ref = module.codec.decode(x0_ref)  # I_out^Ref
        cyc = cycle_loss(
            out_ref,
            ref,
            m,
            rs.weights,
            embed=module.identity if rs.weights.identity else None,
            perceptual=getattr(module, "cycle_perceptual", None),
        )
        for k, v in cyc.items():
            per[k] = per[k].index_put((idx,), v)
    n = max(len(idx), 1)
    cycle = per["cycle"].mean()  # zero for samples without a reference, like the identity loss
    out = dict(terms)
    out["gt"] = terms["loss"]
    out["loss"] = total_loss(terms["loss"], cycle, rs.weights)
    out["cycle"] = cycle
    for k in ("cycle_l1", "cycle_id", "cycle_perc"):
        out[k] = per[k].sum() / n
    return out


# ==================================================================================================
# Inference: masks predicted by the RefSel model
# ==================================================================================================


@torch.no_grad()
def predict_masks(model, lq: list[np.ndarray], refs: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """Contract masks (H, W) uint8 per reference from the RefSel U-Net (pipelines.refsel.predict) on
    (degraded input, reference) pairs of the same size: no annotation needed."""
    from pipelines.refsel import predict, predicted_masks, to_tensor

    pairs = [(i, r) for i, rs in enumerate(refs) for r in rs]
    if not pairs:
        return [[] for _ in refs]
    masks = predicted_masks(
        predict(model, to_tensor([lq[i] for i, _ in pairs]), to_tensor([r for _, r in pairs]))
    )
    out: list[list[np.ndarray]] = [[] for _ in refs]
    for (i, _), m in zip(pairs, masks):
        out[i].append(m)
    return out
