"""Stage `evaluate`: one checkpoint in both modes on every evaluation set, as the papers measure.

    python -m stages.evaluate --eval-sets data/eval_sets --model data/train/model --encoders data/encoders \
        --out data/evaluate --metrics metrics/evaluate.json --report reports/evaluation.md --plot plots/evaluate.csv

Modes: no reference, and 1, 2, 3 references (the first k protocol references; a target with fewer than
k is left out of that row and the row says how many samples it has). Rows per set: the degraded input
(baseline) and each mode. Metrics (pipelines/evaluation.py): PSNR, SSIM, Ref-ID with the primary and
the evaluator encoder, GT-ID (evaluator), copy score on conflict pairs; weight-based metrics (LPIPS,
MUSIQ, CLIP-IQA, MANIQA, FID) are listed as not computed with the reason. Also writes the model bundle
`data/evaluate/bundle` (pipelines/restorer.py) that `register` logs, and grids per set
(degraded | references | output per mode | target).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipelines.embedding import load_identity_encoder
from pipelines.evaluation import NO_WEIGHT_METRICS, copy_score, cosine, embed, psnr_u8, ssim_u8
from pipelines.io import write_bytes, write_json
from pipelines.restorer import Restorer, write_bundle
from pipelines.shards import decode_sample, iter_raw, shard_paths, validate_shards
from pipelines.viz import save_grid
from stages._common import load_params, parser, progress_enabled, setup_logging

COLUMNS = ("n", "psnr", "ssim", "ref_id_primary", "ref_id_evaluator", "gt_id", "copy_score", "copy_pairs")


def load_set(root: str, name: str, limit: int) -> list[dict]:
    out = []
    for raw in iter_raw(shard_paths(root, name)):
        if limit and len(out) >= limit:
            break
        s = decode_sample(raw)
        s["lq"] = np.asarray(Image.open(io.BytesIO(raw["lq.png"])).convert("RGB"))
        out.append(s)
    return out


def row_metrics(outs, samples, prim, evaluator, tau) -> dict:
    gt = np.stack([s["gt"] for s in samples])
    has_ref = [i for i, s in enumerate(samples) if s["refs"]]
    e_out_p, e_out_e = embed(prim, outs), embed(evaluator, outs)
    ref0 = np.stack([samples[i]["refs"][0] for i in has_ref]) if has_ref else None
    m = {
        "n": len(samples),
        "psnr": float(psnr_u8(outs, gt).mean()),
        "ssim": float(ssim_u8(outs, gt).mean()),
        "gt_id": float(cosine(e_out_e, embed(evaluator, gt)).mean()),
        "ref_id_primary": float(cosine(e_out_p[has_ref], embed(prim, ref0)).mean()) if has_ref else None,
        "ref_id_evaluator": float(cosine(e_out_e[has_ref], embed(evaluator, ref0)).mean())
        if has_ref
        else None,
    }
    copies = [
        c
        for i in has_ref
        if samples[i]["masks"][0] is not None
        and (c := copy_score(outs[i], samples[i]["gt"], samples[i]["refs"][0], samples[i]["masks"][0], tau))
        is not None
    ]
    m["copy_score"] = float(np.mean(copies)) if copies else None
    m["copy_pairs"] = len(copies)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}


def markdown(results: dict, not_computed: dict, model: str) -> str:
    lines = [f"# Evaluation of {model}", ""]
    lines.append(
        "Layout of the IConFace paper's Tables 1–2: one block per evaluation set, the degraded input as a "
        "baseline row, then the model without references (blind mode) and with 1–3 references. Ref-ID: cosine "
        "to the first protocol reference (primary encoder / independent evaluator); GT-ID: cosine to the "
        "target (evaluator). Copy score: share of conflict pixels where the output follows the reference "
        "instead of the target (lower is better; pairs with conflict masks only)."
    )
    for name, rows in results.items():
        lines += [
            "",
            f"## {name}",
            "",
            "| row | n | PSNR ↑ | SSIM ↑ | Ref-ID (primary) ↑ | Ref-ID (evaluator) ↑ | GT-ID ↑ | copy ↓ (pairs) |",
        ]
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for row, m in rows.items():

            def f(v):
                return "—" if v is None else f"{v:.4f}"

            lines.append(
                f"| {row} | {m['n']} | {m['psnr']:.2f} | {f(m['ssim'])} | {f(m['ref_id_primary'])} | "
                f"{f(m['ref_id_evaluator'])} | {f(m['gt_id'])} | {f(m['copy_score'])} ({m['copy_pairs']}) |"
            )
    lines += ["", "## Not computed", ""]
    lines += [f"- {k}: {v}" for k, v in not_computed.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    for a in ("--eval-sets", "--model", "--encoders", "--out", "--metrics", "--report", "--plot"):
        p.add_argument(a, required=True)
    args = p.parse_args(argv)
    setup_logging()
    cfgs = load_params(args.params, "evaluate", "train", "embed", "shards")
    cfg, tcfg, ecfg = cfgs["evaluate"], cfgs["train"], cfgs["embed"]
    validate_shards(args.eval_sets)
    out = Path(args.out)
    bundle = write_bundle(
        out / "bundle",
        tcfg,
        args.model,
        ecfg.encoder,
        ecfg.checkpoint,
        cfgs["shards"].resolution,
        steps=cfg.steps,
        guidance=cfg.guidance,
        seed=cfg.seed,
    )
    restorer = Restorer(bundle, threads=cfg.threads)
    prim = restorer.encoder
    ev_path = Path(args.encoders) / "evaluator.safetensors"
    evaluator = load_identity_encoder("small_ir", str(ev_path))[0] if ev_path.is_file() else prim
    not_computed = {
        k: (
            f"weights configured at {path}, but loading {k} weights is not implemented yet"
            if (path := cfg.weights.get(k))
            else f"no local weights (set evaluate.weights.{k}; nothing is downloaded at run time)"
        )
        for k in NO_WEIGHT_METRICS
    }
    if ev_path.is_file() is False:
        not_computed["ref_id_evaluator"] = "no evaluator encoder; the primary encoder stands in"

    index = json.loads((Path(args.eval_sets) / "index.json").read_text())
    results: dict[str, dict] = {}
    plot_rows = []
    total = len(index["splits"]) * len(cfg.modes)
    bar = tqdm(total=total, desc="evaluate", unit="row", disable=not progress_enabled())
    for name in sorted(index["splits"]):
        samples = load_set(args.eval_sets, name, cfg.samples)
        if not samples:
            raise SystemExit(f"error: evaluation set {name} in {args.eval_sets} is empty")
        rows = {
            "degraded input": row_metrics(
                np.stack([s["lq"] for s in samples]), samples, prim, evaluator, cfg.copy_tau
            )
        }
        outputs = {}
        for k in cfg.modes:
            subset = [s for s in samples if len(s["refs"]) >= k]
            if not subset:
                continue
            restored = []
            for i in range(0, len(subset), cfg.batch_size):
                chunk = subset[i : i + cfg.batch_size]
                restored.append(
                    restorer.restore_batch([s["lq"] for s in chunk], [s["refs"][:k] for s in chunk])
                )
            outs = np.concatenate(restored)
            label = "no reference" if k == 0 else f"{k} reference{'s' if k > 1 else ''}"
            # Copy score and Ref-ID are taken against the first reference even in the blind mode.
            rows[label] = row_metrics(outs, subset, prim, evaluator, cfg.copy_tau)
            outputs[k] = {s["key"]: o for s, o in zip(subset, outs)}
            bar.update(1)
        results[name] = rows
        for row, m in rows.items():
            plot_rows.append({"set": name, "row": row, **{c: m[c] for c in COLUMNS}})
        # Grid: degraded | refs | output per mode | target
        show = [s for s in samples if len(s["refs"]) >= max(cfg.modes)][: cfg.grid_samples] or samples[
            : cfg.grid_samples
        ]
        grid = [
            [
                s["lq"],
                *(s["refs"][:3] + [None] * (3 - len(s["refs"][:3]))),
                *(outputs.get(k, {}).get(s["key"]) for k in cfg.modes),
                s["gt"],
            ]
            for s in show
        ]
        save_grid(
            out / f"grid_{name}.png",
            grid,
            title=f"{name}: degraded | references | output with 0..3 references | target",
            col_labels=["degraded", "ref1", "ref2", "ref3", *[f"out {k} ref" for k in cfg.modes], "target"],
            cell=96,
        )
    bar.close()
    metrics = {
        "sets": results,
        "not_computed": not_computed,
        "config": {"steps": cfg.steps, "guidance": cfg.guidance, "samples": cfg.samples},
    }
    write_json(args.metrics, metrics)
    write_bytes(args.report, markdown(results, not_computed, "data/train/model").encode())
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    with open(args.plot, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["set", "row", *COLUMNS])
        w.writeheader()
        w.writerows(plot_rows)
    sev = results.get("severe", next(iter(results.values())))
    best = max((r for r in sev if r != "degraded input"), key=lambda r: sev[r]["psnr"])
    print(
        f"evaluate: {len(results)} sets x {len(cfg.modes)} modes; severe PSNR degraded {sev['degraded input']['psnr']:.2f} -> "
        f"{sev[best]['psnr']:.2f} dB ({best}); report {args.report}"
    )


if __name__ == "__main__":
    main()
