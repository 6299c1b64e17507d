"""Stage `ablate`: the IConFace variants of paper Table 3 trained with one budget, one table.

    python -m stages.ablate --shards data/shards --encoders data/encoders --report reports/ablation.md \
        --metrics metrics/ablate.json

Each variant (`concat`, `+struct`, `+id`, `single_route`, `full`; models/iconface.py) trains from the
same seed for `ablate.steps` steps on the same stream and is evaluated on the same validation batch
(`train.val_preset`). Every variant is an MLflow run nested under one `ablate` run. With the CPU budget
of the embedded default the differences are within noise; the stage is the harness that GPU configs
fill in (raise `ablate.steps`).

RefSTAR's rows (pipelines.refstar.ABLATE_ROWS; list them in `ablate.variants`): `refstar_in_context`
(conflict masks, one joint softmax: eq. 3), `refstar_decoupled` (eq. 4), `refstar_decoupled_cycle`
(+ the cycle loss, eqs. 5 and 7), each on `train.variant` with the masks of the shards ablate reads
(data/shards: the synthetic ground truth; refsel shards: annotated / predicted).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from pipelines.embedding import load_encoders
from pipelines.fit import SCORE, fit
from pipelines.io import write_bytes, write_json
from pipelines.refstar import ABLATE_ROWS, ablate_overrides, mask_provenance
from pipelines.shards import validate_shards
from pipelines.stats import paired_bootstrap
from pipelines.tracking import mark_run, tracking_uri
from pipelines.training import validation_batch
from stages._common import load_params, parser, progress_enabled, setup_logging

COLUMNS = (
    ("restored_id_sim", "ID-GT (refs) ↑"),
    ("restored_noref_id_sim", "ID-GT (no ref) ↑"),
    ("restored_psnr", "PSNR (refs) ↑"),
    ("restored_noref_psnr", "PSNR (no ref) ↑"),
    ("final_loss", "train loss ↓"),
    ("trainable_parameters", "trainable params"),
)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    for a in ("--shards", "--encoders", "--report", "--metrics"):
        p.add_argument(a, required=True)
    args = p.parse_args(argv)
    setup_logging()
    cfgs = load_params(args.params, "ablate", "train", "degrade", "embed")
    cfg, tcfg, dcfg, ecfg = cfgs["ablate"], cfgs["train"], cfgs["degrade"], cfgs["embed"]
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
    results, per_target = {}, {}
    with mlflow.start_run(run_name="ablate") as parent:
        mlflow.log_params(
            {"steps": cfg.steps, "variants": ",".join(cfg.variants), "val_preset": tcfg.val_preset}
        )
        for variant in tqdm(cfg.variants, desc="ablate", unit="variant", disable=not progress_enabled()):
            over = (
                ablate_overrides(variant, masks["option"]) if variant in ABLATE_ROWS else {"variant": variant}
            )
            r = fit(
                replace(base, **over),
                dcfg,
                args.shards,
                encoders,
                val_masked if variant in ABLATE_ROWS else val,
                steps=cfg.steps,
                val_steps=cfg.val_steps,
                inline=True,
            )
            m = r.metrics
            results[variant] = m
            per_target[variant] = r.outputs["per_target"][SCORE]
            with mlflow.start_run(run_name=f"ablate/{variant}", nested=True):
                mlflow.log_param("variant", variant)
                mlflow.log_metrics(
                    {k: float(v) for k, v in {**m, **r.timing}.items() if isinstance(v, int | float)}
                )
        lq = next(iter(results.values()))
        mlflow.log_metrics({"lq_psnr": lq["lq_psnr"], "lq_id_sim": lq["lq_id_sim"]})
        run_id = parent.info.run_id

    lines = [
        "# Ablation of IConFace's parts (paper Table 3 layout)",
        "",
        "Wall-clock training times are in the MLflow runs (`ablate/<variant>`), not here: this file is a DVC output "
        "and must be byte-identical on a rerun.",
        "",
        f"Each row trains from seed {cfg.seed} for {cfg.steps} steps (batch {cfg.batch_size}, backbone "
        f"`{tcfg.backbone}`, prediction `{tcfg.prediction}`) and is evaluated on {len(val['keys'])} validation "
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
    write_bytes(args.report, ("\n".join(lines) + "\n").encode())
    write_json(
        args.metrics, {v: {**{k: m[k] for k, _ in COLUMNS}, "paired": paired[v]} for v, m in results.items()}
    )
    mark_run(mlflow.MlflowClient(), run_id, "ablate", args.metrics)
    best = max(results, key=lambda v: results[v][SCORE])
    print(
        f"ablate: {len(results)} variants x {cfg.steps} steps; best ID-GT {best} {results[best][SCORE]:.4f}; {args.report}"
    )


if __name__ == "__main__":
    main()
