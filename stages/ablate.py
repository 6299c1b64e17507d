"""Stage `ablate`: Table 3's IConFace variants and the seed systems' rows, each paired against its baseline.

    python -m stages.ablate --shards data/shards --encoders data/encoders --init data/train/model \
        --report reports/ablation.md --metrics metrics/ablate.json

`ablate.protocol: finetune` (the default): every row starts from the trained default (`--init`, the train
stage's model) and trains `ablate.steps` more steps at `ablate.lr` on the same stream, so that each row
differs from its baseline by one change: Table 3's variants (`concat`, `+struct`, `+id`, `single_route`,
`full`; models/iconface.py) are the default with parts removed, each paired against the previous one of
the order, in the paper's head (`ablate.table3_readout: off`: the default's reference readout, ours, left
out of them too; it carries the references past the pathways they remove); `default` is the trained
default fine-tuned as it is; the seed systems' rows add their modules to the default and are paired
against the same fine-tune without the addition (`default`, or the row they add to:
pipelines.ablation.ADDON_BASELINES), with one verdict per paper claim (pipelines.ablation.CLAIMS).
`scratch`: every row trains from the seed with the train section's schedule. Every row is evaluated on
the same validation batch (`train.val_preset`) and is an MLflow run nested under one `ablate` run. On
GPUs raise `ablate.steps` (docs/results.md, "The ablation").

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

import torch
from tqdm import tqdm

from pipelines.ablation import (
    SEED002_ROWS,
    control_batch,
    finetune_problems,
    protocol,
    report,
    table3_without_readout,
)
from pipelines.config import DEFAULT_ROW, AblateConfig
from pipelines.embedding import load_encoders
from pipelines.fit import SCORE, fit
from pipelines.io import write_bytes, write_json
from pipelines.refstar import ABLATE_ROWS, ablate_overrides, mask_provenance
from pipelines.shards import iter_samples, validate_shards
from pipelines.tracking import mark_run, tracking_uri
from pipelines.train_config import TrainConfig, with_overrides
from pipelines.validation import validation_batch
from stages._common import load_params, parser, progress_enabled, setup_logging


def refstar_masks(shards: str, base: TrainConfig, val: dict) -> tuple[dict, dict]:
    """(the shards' mask option and provenance, the validation batch with those masks) for the RefSTAR
    rows: `refsel` masks when the shards carry a mask model, the synthetic ground truth otherwise."""
    option = "refsel" if json.loads((Path(shards) / "index.json").read_text()).get("mask_model") else "truth"
    try:
        masks = {"option": option, **mask_provenance(shards, option)}
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    # the same targets, degradations and references, with their masks
    return masks, validation_batch(
        shards, with_overrides(base, {"refstar.reference_masks": option}), base.max_refs
    )


def protocol_inputs(shards: str, n: int) -> tuple[list, list]:
    """(identities, first reference's conflict mask or None) of the first `n` validation samples: the
    wrong-person control's and the copy score's inputs."""
    ids, conflict = [], []
    for i, smp in enumerate(iter_samples(shards, "val")):
        if i >= n:
            break
        ids.append(smp["meta"].get("identity", smp["key"]))
        conflict.append(smp["masks"][0] if smp["masks"] and smp["masks"][0] is not None else None)
    return ids, conflict


def variant_overrides(variant: str, masks: dict | None, table3_off: bool = False) -> tuple[dict, dict]:
    """(train config overrides, sampler options) of one ablation row: Table 3's rows (the reference readout
    off where `table3_off`: AblateConfig.table3_readout), `default` as the trained default (the `full`
    variant), the seed systems' rows with their additions."""
    sampler: dict = {}
    if variant in ABLATE_ROWS:
        over = ablate_overrides(variant, masks["option"])
    elif variant in SEED002_ROWS:
        over, sampler = SEED002_ROWS[variant]
    elif variant == DEFAULT_ROW:
        over = {"variant": "full"}
    else:
        over = {"variant": variant, **({"reference_readout": "off"} if table3_off else {})}
    return over, sampler


def log_variant_run(variant: str, over: dict, sampler: dict, metrics: dict, timing: dict) -> None:
    """One nested MLflow run for a row: its overrides as parameters, its metrics and timings."""
    import mlflow

    with mlflow.start_run(run_name=f"ablate/{variant}", nested=True):
        mlflow.log_param("variant", variant)
        mlflow.log_params({f"override.{k}": v for k, v in {**over, **sampler}.items()})
        mlflow.log_metrics(
            {k: float(v) for k, v in {**metrics, **timing}.items() if isinstance(v, int | float)}
        )


def protocol_base(
    cfg: AblateConfig, tcfg: TrainConfig, base: TrainConfig, init: str | None
) -> tuple[TrainConfig, str | None]:
    """(every row's train config, the folder the rows start from or None) under `ablate.protocol`; a
    fine-tune without the train stage's model or from a default that is not plain IConFace `full`, or a
    scratch run too short to leave its warm-up, exits with the reason."""
    if cfg.protocol == "scratch":
        if tcfg.warmup_steps >= cfg.steps:
            raise SystemExit(
                f"error: ablate.protocol scratch trains {cfg.steps} steps but train.warmup_steps is "
                f"{tcfg.warmup_steps}: no row would leave its warm-up (raise ablate.steps)"
            )
        return base, None
    if not init or not Path(init).is_dir():
        raise SystemExit(
            f"error: ablate.protocol finetune starts from the train stage's model: --init {init!r} "
            "is not a folder (run `dvc repro train`, or set ablate.protocol: scratch)"
        )
    if problems := finetune_problems(tcfg):
        raise SystemExit(
            f"error: ablate.protocol finetune needs the plain IConFace default as its base: {'; '.join(problems)} "
            "(set ablate.protocol: scratch)"
        )
    over = {"lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "lr_schedule": "cosine", "launcher": "local"}
    return with_overrides(base, over), init


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    for a in ("--shards", "--encoders", "--report", "--metrics"):
        p.add_argument(a, required=True)
    p.add_argument("--init", help="the train stage's model folder (ablate.protocol: finetune)")
    args = p.parse_args(argv)
    setup_logging()
    cfgs = load_params(args.params, "ablate", "train", "degrade", "embed", "evaluate")
    cfg, tcfg, dcfg, ecfg = cfgs["ablate"], cfgs["train"], cfgs["degrade"], cfgs["embed"]
    tau = cfgs["evaluate"].copy_tau
    torch.set_num_threads(tcfg.threads)
    validate_shards(args.shards)
    encoders = load_encoders(ecfg, args.encoders)
    base = replace(tcfg, val_samples=cfg.val_samples, seed=cfg.seed, batch_size=cfg.batch_size, accumulate=1)
    base, init = protocol_base(cfg, tcfg, base, args.init)
    val = validation_batch(args.shards, base, base.max_refs)

    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(tcfg.experiment)
    masks, val_masked = None, val
    if any(v in ABLATE_ROWS for v in cfg.variants):  # RefSTAR rows: the masks of these shards
        masks, val_masked = refstar_masks(args.shards, base, val)
    ids, conflict = protocol_inputs(args.shards, len(val["keys"]))
    table3_off = table3_without_readout(cfg, base)
    results, extra, fitted = {}, {}, {}
    with mlflow.start_run(run_name="ablate") as parent:
        mlflow.log_params(
            {
                "protocol": cfg.protocol,
                "init": init,
                "steps": cfg.steps,
                "variants": ",".join(cfg.variants),
                "val_preset": tcfg.val_preset,
            }
        )
        for variant in tqdm(cfg.variants, desc="ablate", unit="variant", disable=not progress_enabled()):
            over, sampler = variant_overrides(variant, masks, table3_off)
            batch = val_masked if variant in ABLATE_ROWS else val
            key = json.dumps(over, sort_keys=True)
            if key not in fitted:  # composite_ensemble samples the composite row's model: one training
                fitted[key] = fit(
                    with_overrides(base, over),
                    dcfg,
                    args.shards,
                    encoders,
                    batch,
                    steps=cfg.steps,
                    val_steps=cfg.val_steps,
                    inline=True,
                    init=init,
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
                None
                if sampler
                else {k: v for k, v in r.outputs.items() if k in ("ref", "none", "ref_as_loaded")},
            )
            m = dict(r.metrics)
            if sampler:  # the ensemble row's own restorations replace the row it was trained as
                m["restored_id_sim"] = round(float(per["ref"].mean()), 4)
                m["restored_psnr"] = round(float(per["ref_psnr"].mean()), 4)
            results[variant] = m
            extra[variant] = per
            log_variant_run(variant, over, sampler, m, r.timing)
        lq = next(iter(results.values()))
        mlflow.log_metrics({"lq_psnr": lq["lq_psnr"], "lq_id_sim": lq["lq_id_sim"]})
        run_id = parent.info.run_id

    markdown, metrics = report(results, extra, cfg, tcfg, len(val["keys"]), masks, tau, init)
    write_bytes(args.report, markdown.encode())
    write_json(args.metrics, metrics)
    mark_run(mlflow.MlflowClient(), run_id, "ablate", args.metrics)
    best = max(results, key=lambda v: results[v][SCORE])
    print(
        f"ablate: {len(results)} variants x {cfg.steps} steps; best ID-GT {best} {results[best][SCORE]:.4f}; {args.report}"
    )


if __name__ == "__main__":
    main()
