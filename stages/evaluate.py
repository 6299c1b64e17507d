"""Stage `evaluate`: one checkpoint in both modes on every evaluation set, as the papers measure.

    python -m stages.evaluate --eval-sets data/eval_sets --model data/train/model --encoders data/encoders \
        --out data/evaluate --metrics metrics/evaluate.json --report reports/evaluation.md --plot plots/evaluate.csv

Modes: no reference, and 1, 2, 3 references (the first k protocol references). Every row of a set is
computed on the SAME targets: the first `evaluate.samples` targets with at least max(modes) references
(paired comparison). Rows per
set: the degraded input (baseline), each mode, and a control, "3 references of another person" (the
same count as the largest mode, taken from the next target of another identity): true references must beat it, or the
model gains from more tokens rather than from who the references show. Each mode's difference to the
blind mode carries a 95 % paired bootstrap interval (pipelines/stats.py, fixed seed); per-target values
go to `data/evaluate/per_target.json` (the registry's paired promotion gate reads them). Metrics (pipelines/evaluation.py): PSNR, SSIM, Ref-ID with the primary and
the evaluator encoder, GT-ID (evaluator), copy score on conflict pairs; weight-based metrics (LPIPS,
MUSIQ, CLIP-IQA, MANIQA, FID) are listed as not computed with the reason. Also writes the model bundle
`data/evaluate/bundle` (pipelines/restorer.py) that `register` logs, and grids per set
(degraded | references | output per mode | target | |output with references - blind| x8, rows
labelled with their GT-ID per mode).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipelines.config import EvaluateConfig
from pipelines.embedding import load_encoders
from pipelines.io import write_bytes, write_json
from pipelines.quality import PER_TARGET, WeightMetrics, load_weight_metrics
from pipelines.reference_gate import calibrate, write_gate
from pipelines.restorer import Restorer, write_bundle
from pipelines.set_evaluation import (
    COLUMNS,
    PAIRED,
    evaluate_set,
    gate_open_modes,
    markdown,
    paired_rows,
    real_photo_figure,
    row_means,
    save_set_grid,
    targets_record,
)
from pipelines.shards import validate_shards
from stages._common import load_params, parser, progress_enabled, setup_logging


def bundle_restorer(out: Path, model: str, cfgs: dict) -> Restorer:
    """Write the restorer bundle of the trained model under `out/bundle` and load it."""
    cfg, tcfg, ecfg = cfgs["evaluate"], cfgs["train"], cfgs["embed"]
    bundle = write_bundle(
        out / "bundle",
        tcfg,
        model,
        ecfg.encoder,
        ecfg.checkpoint,
        cfgs["shards"].resolution,
        steps=cfg.steps,
        guidance=cfg.guidance,
        seed=cfg.seed,
        crop_border=ecfg.crop_border,
    )
    return Restorer(bundle, threads=cfg.threads)


def gate_restorer(
    restorer: Restorer, eval_sets: str, shards: str, cfg: EvaluateConfig, border: float
) -> dict:
    """Fit the reference gate on the validation split of `shards` under every evaluation set's preset,
    record it in the bundle and set it on `restorer` (pipelines.reference_gate); the fit's record, or {}
    with the gate off."""
    g = cfg.reference_gate
    if g.kind == "none":
        return {}
    presets = json.loads((Path(eval_sets) / "index.json").read_text())["config"]["sets"]
    gate, record = calibrate(restorer, shards, presets, g.seed, g.targets, border, cfg.batch_size)
    if gate is not None:
        write_gate(restorer.bundle, gate)
        restorer.gate = gate
    return record


def evaluate_sets(
    restorer: Restorer,
    eval_sets: str,
    cfg: EvaluateConfig,
    evaluator,
    border: float,
    wm: WeightMetrics,
    paired_cols: tuple[str, ...],
    out: Path,
) -> tuple[dict, dict, dict, list[dict]]:
    """(row means per set, paired differences per set, per-target records per set, plot rows): every
    evaluation set restored in every mode, its grid written to `out/grid_<set>.png`."""
    index = json.loads((Path(eval_sets) / "index.json").read_text())
    results: dict[str, dict] = {}
    paired: dict[str, dict] = {}
    targets: dict[str, dict] = {}
    plot_rows = []
    gate_modes = gate_open_modes(restorer, cfg)
    bar = tqdm(
        total=len(index["splits"]) * (len(cfg.modes) + 1 + len(gate_modes)),
        desc="evaluate",
        unit="row",
        disable=not progress_enabled(),
    )
    for name in sorted(index["splits"]):
        try:
            res = evaluate_set(
                restorer, eval_sets, name, cfg, restorer.encoder, evaluator, border, wm, bar, gate_modes
            )
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from exc
        results[name] = {row: row_means(v) for row, v in res.values.items()}
        if wm.inception is not None:
            ref_stats = wm.reference_stats(np.stack([s["gt"] for s in res.samples]))
            for row, o in res.outputs.items():
                results[name][row]["fid"] = round(wm.fid(o, ref_stats), 4)
        paired[name] = paired_rows(res, paired_cols, cfg.seed)
        targets[name] = targets_record(res)
        for row, m in results[name].items():
            plot_rows.append({"set": name, "row": row, **{c: m[c] for c in COLUMNS}})
        save_set_grid(out / f"grid_{name}.png", name, res, tuple(cfg.modes), cfg.grid_samples)
    bar.close()
    return results, paired, targets, plot_rows


def write_plot_rows(path: str, plot_rows: list[dict]) -> None:
    """The DVC plot's CSV: one row per set and mode with the table's columns."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["set", "row", *COLUMNS])
        w.writeheader()
        w.writerows(plot_rows)


def summary_line(results: dict, paired: dict, cfg: EvaluateConfig, report: str) -> str:
    """The closing line: sets and modes, the severe set's PSNR, and its 1-reference GT-ID gain."""
    sev = results.get("severe", next(iter(results.values())))
    d = paired.get("severe", next(iter(paired.values()))).get("1 reference", {}).get("gt_id")
    return (
        f"evaluate: {len(results)} sets x {len(cfg.modes)} modes + control on {sev['degraded input']['n']} paired targets; "
        f"severe PSNR {sev['degraded input']['psnr']:.2f} -> {sev.get('no reference', sev['degraded input'])['psnr']:.2f} dB (blind); "
        + (f"GT-ID 1 ref - blind {d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]; " if d else "")
        + f"report {report}"
    )


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    for a in ("--eval-sets", "--shards", "--model", "--encoders", "--out", "--metrics", "--report", "--plot"):
        p.add_argument(a, required=True)
    p.add_argument("--report-grid", help="also copy the severe set's grid here (committed beside the report)")
    p.add_argument(
        "--real-photo", help="also restore a real photo end to end and write the before/after here"
    )
    args = p.parse_args(argv)
    setup_logging()
    cfgs = load_params(args.params, "evaluate", "train", "embed", "shards")
    cfg, ecfg = cfgs["evaluate"], cfgs["embed"]
    validate_shards(args.eval_sets)
    out = Path(args.out)
    restorer = bundle_restorer(out, args.model, cfgs)
    gate = gate_restorer(restorer, args.eval_sets, args.shards, cfg, ecfg.crop_border)
    encoders = load_encoders(ecfg, args.encoders)
    wm = load_weight_metrics(cfg.weights)
    not_computed = dict(wm.not_computed)
    paired_cols = (*PAIRED, *(c for c in wm.columns if c in PER_TARGET))
    if encoders.fallback:
        not_computed["ref_id_evaluator"] = encoders.fallback

    results, paired, targets, plot_rows = evaluate_sets(
        restorer, args.eval_sets, cfg, encoders.evaluator, ecfg.crop_border, wm, paired_cols, out
    )
    metrics = {
        "sets": results,
        "paired": paired,
        "not_computed": not_computed,
        "weights": wm.files,
        "config": {
            "steps": cfg.steps,
            "guidance": cfg.guidance,
            "samples": cfg.samples,
            "targets_with_refs": max(cfg.modes),
        },
        "reference_gate": gate,
    }
    write_json(args.metrics, metrics)
    write_json(out / "per_target.json", targets)
    if args.report_grid:
        name = "severe" if "severe" in results else sorted(results)[0]
        write_bytes(args.report_grid, (out / f"grid_{name}.png").read_bytes())
    if args.real_photo:
        print(real_photo_figure(restorer, args.real_photo))
    write_bytes(
        args.report,
        markdown(
            results, paired, not_computed, "data/train/model", cfg.seed, wm.files, gate, cfg.steps
        ).encode(),
    )
    write_plot_rows(args.plot, plot_rows)
    print(summary_line(results, paired, cfg, args.report))


if __name__ == "__main__":
    main()
