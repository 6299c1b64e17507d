"""Stage `ablate`: the IConFace variants of paper Table 3 trained with one budget, one table.

    python -m stages.ablate --shards data/shards --encoders data/encoders --report reports/ablation.md \
        --metrics metrics/ablate.json

Each variant (`concat`, `+struct`, `+id`, `single_route`, `full`; models/iconface.py) trains from the
same seed for `ablate.steps` steps on the same stream and is evaluated on the same validation batch
(`train.val_preset`). Every variant is an MLflow run nested under one `ablate` run. The default budget
is the CPU's; on GPUs raise `ablate.steps` (what the default shows: docs/results.md, "The ablation").

RefSTAR's rows (pipelines.refstar.ABLATE_ROWS; list them in `ablate.variants`): `refstar_in_context`
(conflict masks, one joint softmax: eq. 3), `refstar_decoupled` (eq. 4), `refstar_decoupled_cycle`
(+ the cycle loss, eqs. 5 and 7), each on `train.variant` with the masks of the shards ablate reads
(data/shards: the synthetic ground truth; refsel shards: annotated / predicted).

Seed 002's rows (`SEED002_ROWS`; Composite Context, arXiv:2505.21905): `composite` (train.conditioning:
composite, its Sec. 3.1) and
`composite_ensemble`, the same trained model sampled with the training-free multi-reference ensemble
(its eq. 6): one training, two rows.

One protocol for every row: the same validation targets, degradations and references; ID-GT
with references and blind; the **wrong-person control** (each target restored with as many references
of the next validation target of another identity; true − other with a paired interval); the **copy
score in conflict regions** (pipelines.evaluation.copy_score with `evaluate.copy_tau`, on the first
reference's conflict mask where the shards carry one: the share of conflict pixels the output takes
from the reference rather than from the target; lower is better).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipelines.batches import to_uint8
from pipelines.embedding import load_encoders
from pipelines.fit import SCORE, fit
from pipelines.io import write_bytes, write_json
from pipelines.network import reference_readout
from pipelines.refstar import ABLATE_ROWS, ablate_overrides, mask_provenance
from pipelines.shards import iter_samples, validate_shards
from pipelines.stats import paired_bootstrap
from pipelines.tracking import mark_run, tracking_uri
from pipelines.validation import no_refs, psnr, validation_batch
from stages._common import load_params, parser, progress_enabled, setup_logging

COLUMNS = (
    ("restored_id_sim", "ID-GT (refs) ↑"),
    ("restored_noref_id_sim", "ID-GT (no ref) ↑"),
    ("restored_psnr", "PSNR (refs) ↑"),
    ("restored_noref_psnr", "PSNR (no ref) ↑"),
    ("final_loss", "train loss ↓"),
    ("trainable_parameters", "trainable params"),
)


# seed 002's rows: (train overrides, sampler options)
SEED002_ROWS: dict[str, tuple[dict, dict]] = {
    "composite": ({"conditioning": "composite"}, {}),
    "composite_ensemble": ({"conditioning": "composite"}, {"ref_ensemble": True}),
}
PER_REFERENCE = ("refs", "ref_mask", "z_refs", "ref_consistent")  # batch keys that belong to the references


def control_batch(batch: dict, identities: list[str]) -> tuple[dict, list[bool]]:
    """The wrong-person control: every target gets the references of the next target (cyclically) of
    another identity, preferring one with at least as many, cut to the smaller count. Returns the batch
    and, per target, whether it has a control (False where the batch holds no other identity: those
    targets keep their own references and are left out of the control's pairs)."""
    counts = batch["ref_mask"].sum(1).tolist()
    n = len(identities)
    pick, has = [], []
    for i in range(n):
        others = [(i + step) % n for step in range(1, n) if identities[(i + step) % n] != identities[i]]
        enough = [j for j in others if counts[j] >= counts[i]]
        j = enough[0] if enough else max(others, key=lambda k: counts[k]) if others else i
        pick.append(j)
        has.append(bool(others))
    out = dict(batch)
    for k in PER_REFERENCE:
        if k in batch:
            out[k] = batch[k][pick]
    count = torch.tensor([min(counts[i], counts[j]) for i, j in enumerate(pick)])
    keep = torch.arange(batch["ref_mask"].shape[1])[None, :] < count[:, None]
    out["ref_mask"] = out["ref_mask"] & keep
    return out, has


def protocol(
    module, batch, control, has_control, evaluator, steps, guidance, masks, tau, sampler, known=None
) -> dict:
    """Per-target ID-GT with references, blind and with the control's references, and the copy score
    of the output with references in the first reference's conflict region (NaN where none)."""
    import torch.nn.functional as F

    from models.id_encoder import raw_embedding
    from pipelines.evaluation import copy_score

    def unit(x):
        return F.normalize(
            raw_embedding(evaluator.eval(), (x.clamp(-1, 1) + 1) / 2, module.crop_border), dim=-1
        )

    with torch.no_grad():
        g = unit(batch["gt"])
        outs = dict(known or {})  # fit's validation restorations, when they are this row's
        if "ref" not in outs:
            outs["ref"] = module.restore(batch, steps=steps, guidance=guidance, **sampler)
        if "none" not in outs:
            outs["none"] = module.restore(no_refs(batch), steps=steps, guidance=guidance)
        outs["control"] = module.restore(control, steps=steps, guidance=guidance, **sampler)
        per = {k: (unit(v) * g).sum(-1).numpy() for k, v in outs.items()}
        per["control"] = np.where(has_control, per["control"], np.nan)  # no other identity: no pair
        per["ref_psnr"] = psnr(outs["ref"], batch["gt"])
    out_u8, gt_u8, ref_u8 = to_uint8(outs["ref"]), to_uint8(batch["gt"]), to_uint8(batch["refs"][:, 0])
    copies = []
    for i, m in enumerate(masks):
        c = (
            None
            if m is None or not bool(batch["ref_mask"][i, 0])
            else copy_score(out_u8[i], gt_u8[i], ref_u8[i], m, tau)
        )
        copies.append(np.nan if c is None else c)
    per["copy"] = np.array(copies, np.float64)
    return per


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    for a in ("--shards", "--encoders", "--report", "--metrics"):
        p.add_argument(a, required=True)
    args = p.parse_args(argv)
    setup_logging()
    cfgs = load_params(args.params, "ablate", "train", "degrade", "embed", "evaluate")
    cfg, tcfg, dcfg, ecfg = cfgs["ablate"], cfgs["train"], cfgs["degrade"], cfgs["embed"]
    tau = cfgs["evaluate"].copy_tau
    torch.set_num_threads(tcfg.threads)
    validate_shards(args.shards)
    encoders = load_encoders(ecfg, args.encoders)
    base = replace(tcfg, val_samples=cfg.val_samples, seed=cfg.seed, batch_size=cfg.batch_size, accumulate=1)
    val = validation_batch(args.shards, base, base.max_refs)

    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(tcfg.experiment)
    masks, val_masked = None, val
    if any(v in ABLATE_ROWS for v in cfg.variants):  # RefSTAR rows: the masks of these shards
        option = (
            "refsel"
            if json.loads((Path(args.shards) / "index.json").read_text()).get("mask_model")
            else "truth"
        )
        try:
            masks = {"option": option, **mask_provenance(args.shards, option)}
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from exc
        # the same targets, degradations and references, with their masks
        val_masked = validation_batch(args.shards, replace(base, reference_masks=option), base.max_refs)
    # the protocol's inputs: identities (control), the first reference's conflict masks (copy score)
    ids, conflict = [], []
    for i, smp in enumerate(iter_samples(args.shards, "val")):
        if i >= len(val["keys"]):
            break
        ids.append(smp["meta"].get("identity", smp["key"]))
        conflict.append(smp["masks"][0] if smp["masks"] and smp["masks"][0] is not None else None)
    results, per_target, extra, fitted = {}, {}, {}, {}
    with mlflow.start_run(run_name="ablate") as parent:
        mlflow.log_params(
            {"steps": cfg.steps, "variants": ",".join(cfg.variants), "val_preset": tcfg.val_preset}
        )
        for variant in tqdm(cfg.variants, desc="ablate", unit="variant", disable=not progress_enabled()):
            sampler: dict = {}
            if variant in ABLATE_ROWS:
                over = ablate_overrides(variant, masks["option"])
            elif variant in SEED002_ROWS:
                over, sampler = SEED002_ROWS[variant]
            else:
                over = {"variant": variant}
            batch = val_masked if variant in ABLATE_ROWS else val
            key = json.dumps(over, sort_keys=True)
            if key not in fitted:  # composite_ensemble samples the composite row's model: one training
                fitted[key] = fit(
                    replace(base, **over),
                    dcfg,
                    args.shards,
                    encoders,
                    batch,
                    steps=cfg.steps,
                    val_steps=cfg.val_steps,
                    inline=True,
                )
            r = fitted[key]
            per = protocol(
                r.module,
                batch,
                *control_batch(batch, ids),
                encoders.evaluator,
                cfg.val_steps,
                tcfg.val_guidance,
                conflict,
                tau,
                sampler,
                # fit validated this row with the same batch, steps and guidance: reuse its restorations
                None if sampler else {k: r.outputs[k] for k in ("ref", "none")},
            )
            m = dict(r.metrics)
            if sampler:  # the ensemble row's own restorations replace the row it was trained as
                m["restored_id_sim"] = round(float(per["ref"].mean()), 4)
                m["restored_psnr"] = round(float(per["ref_psnr"].mean()), 4)
            results[variant] = m
            per_target[variant] = per["ref"]
            extra[variant] = per
            with mlflow.start_run(run_name=f"ablate/{variant}", nested=True):
                mlflow.log_param("variant", variant)
                mlflow.log_params({f"override.{k}": v for k, v in {**over, **sampler}.items()})
                mlflow.log_metrics(
                    {k: float(v) for k, v in {**m, **r.timing}.items() if isinstance(v, int | float)}
                )
        lq = next(iter(results.values()))
        mlflow.log_metrics({"lq_psnr": lq["lq_psnr"], "lq_id_sim": lq["lq_id_sim"]})
        run_id = parent.info.run_id

    lines = [
        "# Ablation of IConFace's parts (paper Table 3 layout), seed 002 and RefSTAR under one protocol",
        "",
        "Wall-clock training times are in the MLflow runs (`ablate/<variant>`), not here: this file is a DVC output "
        "and must be byte-identical on a rerun.",
        "",
        f"Each row trains from seed {cfg.seed} for {cfg.steps} steps (batch {cfg.batch_size}, backbone "
        f"`{tcfg.backbone}`, prediction `{tcfg.prediction}`, reference readout "
        f"{'on' if reference_readout(tcfg) else 'off'}) and is evaluated on {len(val['keys'])} validation "
        f"targets degraded with `{tcfg.val_preset}`. ID-GT: cosine to the target with the evaluator encoder. "
        f"Degraded input: PSNR {lq['lq_psnr']:.2f} dB, ID-GT {lq['lq_id_sim']:.4f}. MLflow: the `ablate` run "
        "of experiment `"
        + tcfg.experiment
        + "`."
        + (
            f" RefSTAR rows (variant `{tcfg.variant}`): conflict masks `{masks['option']}` "
            f"({', '.join(f'{k} {n}' for k, n in masks['provenance'].items())} masks in the train split)."
            if masks
            else ""
        ),
        "",
        "| variant | " + " | ".join(c[1] for c in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for v, m in results.items():
        cells = [
            f"{m[k]:,}" if k == "trainable_parameters" else f"{m[k]:.2f}" if "psnr" in k else f"{m[k]:.4f}"
            for k, _ in COLUMNS
        ]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    # Paired differences on the same targets: each variant against the one before it in Table 3's order
    # and against concat (the paper's base), 95 % bootstrap intervals.
    names = list(results)
    paired = {}
    lines += [
        "",
        f"Paired differences of ID-GT with references on the same {len(val['keys'])} targets (mean [95 % bootstrap "
        f"interval], seed {cfg.seed}); an interval that contains 0 is no difference:",
        "",
        "| variant | vs previous row | verdict | vs concat | verdict |",
        "|---|---:|---|---:|---|",
    ]
    for i, v in enumerate(names):
        row = {}
        for label, other in (("previous", names[i - 1] if i else None), ("concat", names[0])):
            if other is None or other == v:
                row[label] = None
                continue
            d = paired_bootstrap(per_target[v], per_target[other], seed=cfg.seed)
            row[label] = {**d.as_dict(), "vs": other, "verdict": d.verdict}
        paired[v] = row
        cells = [
            (f"{c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}] | {c['verdict']}" if c else "— | —")
            for c in (row["previous"], row["concat"])
        ]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")

    def steps_of(ok: bool) -> list[str]:
        """Table 3's steps between consecutive IConFace variants (RefSTAR rows apart) that hold (ok) or not."""
        return [
            f"{names[i - 1]} < {v}" if ok else f"{names[i - 1]} vs {v}: {paired[v]['previous']['verdict']}"
            for i, v in enumerate(names)
            if i
            and v not in ABLATE_ROWS
            and names[i - 1] not in ABLATE_ROWS
            and paired[v]["previous"]
            and (paired[v]["previous"]["verdict"] == "higher") == ok
        ]

    ordered, not_ordered = steps_of(True), steps_of(False)
    lines += [
        "",
        "The paper's order (Table 3) is concat < +struct < +id < single_route < full on ID-GT.",
        f"Holds here (interval clear of zero): {', '.join(ordered) or 'no step'}.",
        f"Does not hold (no difference or reversed): {', '.join(not_ordered) or 'none'}.",
    ]
    if masks:
        lines += [
            "RefSTAR (its Table 2): the decoupled cross-attention and the cycle loss each raise ID-GT and ID-Ref; "
            "read the RefSTAR rows against the row before them.",
        ]
    # One protocol for every row: the reference gain, the wrong-person control and the copy score.
    proto = {}
    lines += [
        "",
        "## One protocol for every row",
        "",
        f"On the same {len(val['keys'])} targets: ID-GT with references − blind; with the true references − "
        "with as many references of another person (the next validation target of another identity); the "
        f"copy score in the first reference's conflict region (τ = {tau:g}; the share of conflict pixels taken "
        "from the reference rather than the target, lower is better; mean over the targets whose reference has "
        "a conflict region). Intervals: 95 % paired bootstrap, seed "
        f"{cfg.seed}; an interval that contains 0 is no difference.",
        "",
        "| row | refs − blind | verdict | true − other person | verdict | copy (conflict) ↓ | pairs |",
        "|---|---:|---|---:|---|---:|---:|",
    ]
    for v in names:
        per = extra[v]
        gain = paired_bootstrap(per["ref"], per["none"], seed=cfg.seed)
        ok = np.isfinite(per["control"])
        ctl = paired_bootstrap(per["ref"][ok], per["control"][ok], seed=cfg.seed)
        copies = per["copy"][np.isfinite(per["copy"])]
        copy = round(float(copies.mean()), 4) if len(copies) else None
        proto[v] = {
            "ref_minus_blind": {**gain.as_dict(), "verdict": gain.verdict},
            "true_minus_other": {**ctl.as_dict(), "verdict": ctl.verdict},
            "control_id_sim": round(float(per["control"][ok].mean()), 4) if ok.any() else None,
            "copy_score": copy,
            "copy_pairs": int(len(copies)),
        }
        lines.append(
            f"| {v} | {gain.text()} | {gain.verdict} | "
            f"{ctl.text()} | {ctl.verdict} | "
            f"{'—' if copy is None else f'{copy:.4f}'} | {len(copies)} |"
        )
    helps = [v for v in names if proto[v]["true_minus_other"]["verdict"] == "higher"]
    lines += [
        "",
        f"Rows whose true references beat another person's (interval clear of zero): {', '.join(helps) or 'none'}.",
    ]
    write_bytes(args.report, ("\n".join(lines) + "\n").encode())
    write_json(
        args.metrics,
        {
            v: {**{k: m[k] for k, _ in COLUMNS}, "paired": paired[v], "protocol": proto[v]}
            for v, m in results.items()
        },
    )
    mark_run(mlflow.MlflowClient(), run_id, "ablate", args.metrics)
    best = max(results, key=lambda v: results[v][SCORE])
    print(
        f"ablate: {len(results)} variants x {cfg.steps} steps; best ID-GT {best} {results[best][SCORE]:.4f}; {args.report}"
    )


if __name__ == "__main__":
    main()
