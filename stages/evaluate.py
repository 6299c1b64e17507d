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
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipelines.embedding import load_encoders
from pipelines.evaluation import copy_score, cosine, embed, psnr_u8, ssim_u8
from pipelines.io import write_bytes, write_json
from pipelines.quality import LOWER_IS_BETTER, PER_TARGET, WeightMetrics, load_weight_metrics
from pipelines.restorer import Restorer, write_bundle
from pipelines.shards import decode_sample, iter_raw, shard_paths, validate_shards
from pipelines.stats import paired_bootstrap
from pipelines.viz import change_map, save_grid
from stages._common import load_params, parser, progress_enabled, setup_logging

COLUMNS = ("n", "psnr", "ssim", "ref_id_primary", "ref_id_evaluator", "gt_id", "copy_score", "copy_pairs")
PAIRED = ("gt_id", "psnr", "ssim", "copy_score")  # differences to the blind mode, with intervals
CONTROL = "{k} reference{s} of another person"
FRONT = "front end alone"  # ours: the stage-1 output (names must be valid MLflow metric keys)


def mode_label(k: int) -> str:
    """The row name of a mode: "no reference", "1 reference", "2 references", ..."""
    return "no reference" if k == 0 else f"{k} reference{'s' if k > 1 else ''}"


def load_set(root: str, name: str, limit: int, min_refs: int = 0) -> tuple[list[dict], int]:
    """The first `limit` targets (0: all) of a set that have at least `min_refs` references, and how
    many targets were read to find them."""
    out, seen = [], 0
    for raw in iter_raw(shard_paths(root, name)):
        if limit and len(out) >= limit:
            break
        seen += 1
        if json.loads(raw["meta.json"])["ref_count"] < min_refs:
            continue
        s = decode_sample(raw)
        s["lq"] = np.asarray(Image.open(io.BytesIO(raw["lq.png"])).convert("RGB"))
        out.append(s)
    return out, seen


def per_target(
    outs, samples, prim, evaluator, tau, border, wm: WeightMetrics | None = None
) -> dict[str, np.ndarray]:
    """Per-target metrics (N,) of outputs `outs`. Ref-ID and the copy score are taken against each
    target's first true reference (in every row, the blind mode and the control included); LPIPS,
    DISTS and CLIP-IQA when their weights are configured (`wm`)."""
    gt = np.stack([s["gt"] for s in samples])
    ref0 = np.stack([s["refs"][0] for s in samples])
    e_out_p, e_out_e = embed(prim, outs, border), embed(evaluator, outs, border)
    copies = []
    for o, s in zip(outs, samples):
        c = None if s["masks"][0] is None else copy_score(o, s["gt"], s["refs"][0], s["masks"][0], tau)
        copies.append(np.nan if c is None else c)
    return {
        "psnr": psnr_u8(outs, gt),
        "ssim": ssim_u8(outs, gt),
        "gt_id": cosine(e_out_e, embed(evaluator, gt, border)),
        "ref_id_primary": cosine(e_out_p, embed(prim, ref0, border)),
        "ref_id_evaluator": cosine(e_out_e, embed(evaluator, ref0, border)),
        "copy_score": np.array(copies, np.float64),
        **(wm.per_target(outs, gt) if wm is not None else {}),
    }


def summarise(values: dict[str, np.ndarray]) -> dict:
    copies = values["copy_score"][np.isfinite(values["copy_score"])]
    m = {"n": len(values["psnr"])}
    for k in ("psnr", "ssim", "ref_id_primary", "ref_id_evaluator", "gt_id"):
        m[k] = round(float(np.mean(values[k])), 4)
    m["copy_score"] = round(float(copies.mean()), 4) if len(copies) else None
    m["copy_pairs"] = int(len(copies))
    for k in PER_TARGET:
        if k in values:
            m[k] = round(float(np.mean(values[k])), 4)
    return m


def other_person(samples: list[dict], pool: list[dict], k: int) -> list[list]:
    """For each target, the first k references of the next target in `pool` (cyclically, after the
    target's own key) whose identity differs: the control row's references, as many as the true ones."""
    keys = [p["key"] for p in pool]
    out = []
    for s in samples:
        start = keys.index(s["key"]) if s["key"] in keys else 0
        for step in range(1, len(pool) + 1):
            o = pool[(start + step) % len(pool)]
            if o["meta"].get("identity") != s["meta"].get("identity") and len(o["refs"]) >= k:
                out.append(o["refs"][:k])
                break
        else:
            raise SystemExit(
                f"error: no target of another identity with {k} references for {s['key']}; "
                "the control row needs at least two identities"
            )
    return out


def markdown(
    results: dict, paired: dict, not_computed: dict, model: str, seed: int, files: dict | None = None
) -> str:
    files = files or {}
    extra = [
        c for c in (*PER_TARGET, "fid") if any(c in m for rows in results.values() for m in rows.values())
    ]
    arrow = {c: "↓" if c in LOWER_IS_BETTER else "↑" for c in extra}
    names = {
        "lpips": "LPIPS",
        "lpips_vgg": "LPIPS (vgg)",
        "dists": "DISTS",
        "clipiqa": "CLIP-IQA",
        "fid": "FID",
    }
    paired_cols = [*PAIRED, *(c for c in extra if c in PER_TARGET)]
    lines = [f"# Evaluation of {model}", ""]
    lines.append(
        "Layout of the IConFace paper's Tables 1–2: one block per evaluation set, the degraded input as a "
        "baseline row, then the model without references (blind mode), with 1–3 references, and a control "
        "with as many references of another person. **Every row of a block is computed on the same targets** "
        "(those with 3 references). Ref-ID: cosine to the first protocol reference (primary encoder / "
        "independent evaluator); GT-ID: cosine to the target (evaluator). Copy score: share of conflict pixels "
        "where the output follows the reference instead of the target (lower is better; pairs with conflict "
        "masks only). With a degradation-removal front end (ours, DiffBIR's stage 1; train_front) its output "
        "alone is a row too: what the IConFace transformer and the references add is the difference to it."
    )
    for name, rows in results.items():
        lines += [
            "",
            f"## {name}",
            "",
            "| row | n | PSNR ↑ | SSIM ↑ | Ref-ID (primary) ↑ | Ref-ID (evaluator) ↑ | GT-ID ↑ | copy ↓ (pairs) |"
            + "".join(f" {names[c]} {arrow[c]} |" for c in extra),
        ]
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra))
        for row, m in rows.items():

            def f(v):
                return "—" if v is None else f"{v:.4f}"

            lines.append(
                f"| {row} | {m['n']} | {m['psnr']:.2f} | {f(m['ssim'])} | {f(m['ref_id_primary'])} | "
                f"{f(m['ref_id_evaluator'])} | {f(m['gt_id'])} | {f(m['copy_score'])} ({m['copy_pairs']}) |"
                + "".join(f" {f(m.get(c))} |" for c in extra)
            )
        lines += [
            "",
            f"Paired differences to the blind mode (same targets; mean [95 % bootstrap interval], seed {seed}); "
            "an interval that contains 0 is no difference:",
            "",
            "| row | Δ GT-ID | Δ PSNR (dB) | Δ SSIM | Δ copy |"
            + "".join(f" Δ {names[c]} |" for c in paired_cols[len(PAIRED) :])
            + " verdict on GT-ID |",
            "|---|---:|---:|---:|---:|" + "---:|" * (len(paired_cols) - len(PAIRED)) + "---|",
        ]
        for row, d in paired[name].items():
            if row == "true vs another person":
                continue
            cells = [
                "—"
                if m not in d or d[m]["n"] == 0
                else f"{d[m]['diff']:+.4f} [{d[m]['lo']:+.4f}, {d[m]['hi']:+.4f}]"
                for m in paired_cols
            ]
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {d['gt_id']['verdict']} |")
        c = paired[name].get("true vs another person")
        if c:
            lines += [
                "",
                f"Control: GT-ID with the true references minus with another person's ({c['rows'][0]}, same targets): "
                f"{c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}] — {c['verdict']}"
                + (" (the model reads who the references show)" if c["verdict"] == "higher" else ""),
            ]
    if "fid" in extra:
        lines += [
            "",
            "FID is one number per row (the row's outputs against the reference statistics), without an "
            "interval: on a few tens of targets it is dominated by its own sampling error.",
        ]
    if files:
        lines += ["", "## Weights", "", "| column | key | file | sha256 |", "|---|---|---|---|"]
        lines += [
            f"| {c} | {f['key']} | {f['file']} | `{f['sha256']}` |" for c, fs in files.items() for f in fs
        ]
    lines += ["", "## Not computed", ""]
    lines += [f"- {k}: {v}" for k, v in not_computed.items()]
    return "\n".join(lines) + "\n"


def real_photo_figure(restorer, path: str | Path) -> str:
    """A real photo through `refface restore` (detect, align, restore, paste back) with the trained model:
    matplotlib's Grace Hopper sample (512x600, a local file of the installed package). Returns a line
    for the log. The model of the embedded default knows 64 px synthetic faces, and the figure says so."""
    import matplotlib.cbook as cbook

    from pipelines.faces import FaceAligner, paste_back
    from pipelines.images import load_rgb

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        photo, _ = load_rgb("grace_hopper.jpg", data=f.read())
    aligner = FaceAligner(restorer.resolution)
    faces = aligner.detect(photo)
    if not faces:
        return "real photo: no face found (the figure is not written)"
    crops = [aligner.align(photo, face) for face in faces]
    restored = list(restorer.restore_batch(crops, [[] for _ in crops]))
    out = paste_back(photo, faces, restored)

    def square(img):
        side = max(img.shape[:2])
        canvas = np.full((side, side, 3), 255, np.uint8)
        y, x = (side - img.shape[0]) // 2, (side - img.shape[1]) // 2
        canvas[y : y + img.shape[0], x : x + img.shape[1]] = img
        return canvas

    save_grid(
        path,
        [[square(photo), square(out)], [crops[0], restored[0]]],
        title="refface restore on a real photo (Grace Hopper, matplotlib's sample): the embedded default's model, "
        "trained on 64 px synthetic faces",
        row_labels=["photo", "face"],
        col_labels=["input", "restored (pasted back)"],
        cell=300,
    )
    return f"real photo: {len(faces)} face(s) restored and pasted back -> {path}"


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    for a in ("--eval-sets", "--model", "--encoders", "--out", "--metrics", "--report", "--plot"):
        p.add_argument(a, required=True)
    p.add_argument("--report-grid", help="also copy the severe set's grid here (committed beside the report)")
    p.add_argument(
        "--real-photo", help="also restore a real photo end to end and write the before/after here"
    )
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
        crop_border=ecfg.crop_border,
    )
    restorer = Restorer(bundle, threads=cfg.threads)
    encoders = load_encoders(ecfg, args.encoders)
    prim, evaluator, border = restorer.encoder, encoders.evaluator, ecfg.crop_border
    wm = load_weight_metrics(cfg.weights)
    not_computed = dict(wm.not_computed)
    paired_cols = (*PAIRED, *(c for c in wm.columns if c in PER_TARGET))
    if encoders.fallback:
        not_computed["ref_id_evaluator"] = encoders.fallback

    index = json.loads((Path(args.eval_sets) / "index.json").read_text())
    kmax = max(cfg.modes)
    results: dict[str, dict] = {}
    paired: dict[str, dict] = {}
    targets: dict[str, dict] = {}
    plot_rows = []
    total = len(index["splits"]) * (len(cfg.modes) + 1)
    bar = tqdm(total=total, desc="evaluate", unit="row", disable=not progress_enabled())

    def restore(lqs, refs):
        parts = [
            restorer.restore_batch(lqs[i : i + cfg.batch_size], refs[i : i + cfg.batch_size])
            for i in range(0, len(lqs), cfg.batch_size)
        ]
        return np.concatenate(parts)

    for name in sorted(index["splits"]):
        samples, seen = load_set(args.eval_sets, name, cfg.samples, max(kmax, 1))
        if len(samples) < 2:
            raise SystemExit(
                f"error: evaluation set {name} in {args.eval_sets} has {len(samples)} targets with "
                f"{max(kmax, 1)} references (of {seen}); need at least 2 for a paired comparison"
            )
        lq = [s["lq"] for s in samples]
        row_outs = {"degraded input": np.stack(lq)}
        values = {
            "degraded input": per_target(np.stack(lq), samples, prim, evaluator, cfg.copy_tau, border, wm)
        }
        front = restorer.front_only(lq)
        if front is not None:  # stage 1 alone: what the transformer adds is the difference to it
            values[FRONT] = per_target(front, samples, prim, evaluator, cfg.copy_tau, border, wm)
            row_outs[FRONT] = front
        outputs = {}
        for k in cfg.modes:
            outs = restore(lq, [s["refs"][:k] for s in samples])
            label = mode_label(k)
            values[label] = per_target(outs, samples, prim, evaluator, cfg.copy_tau, border, wm)
            row_outs[label] = outs
            outputs[k] = {s["key"]: o for s, o in zip(samples, outs)}
            bar.update(1)
        k_ctl = max(kmax, 1)
        pool = samples if not cfg.samples else load_set(args.eval_sets, name, 0, k_ctl)[0]
        outs = restore(lq, other_person(samples, pool, k_ctl))
        control = CONTROL.format(k=k_ctl, s="s" if k_ctl > 1 else "")
        values[control] = per_target(outs, samples, prim, evaluator, cfg.copy_tau, border, wm)
        row_outs[control] = outs
        bar.update(1)
        results[name] = {row: summarise(v) for row, v in values.items()}
        if wm.inception is not None:
            ref_stats = wm.reference_stats(np.stack([s["gt"] for s in samples]))
            for row, o in row_outs.items():
                results[name][row]["fid"] = round(wm.fid(o, ref_stats), 4)
        blind = values.get("no reference")
        paired[name] = {}
        for row, v in values.items():
            if blind is None or row in ("no reference",):
                continue
            paired[name][row] = {}
            for m in paired_cols:
                r = paired_bootstrap(v[m], blind[m], seed=cfg.seed)
                paired[name][row][m] = {**r.as_dict(), "verdict": r.verdict}
        true_label = mode_label(k_ctl)
        if true_label in values:
            d = paired_bootstrap(values[true_label]["gt_id"], values[control]["gt_id"], seed=cfg.seed)
            paired[name]["true vs another person"] = {
                "rows": [true_label, control],
                **d.as_dict(),
                "verdict": d.verdict,
            }
        targets[name] = {
            "keys": [s["key"] for s in samples],
            "rows": {
                row: {m: [round(float(x), 5) for x in v[m]] for m in PAIRED} for row, v in values.items()
            },
        }
        for row, m in results[name].items():
            plot_rows.append({"set": name, "row": row, **{c: m[c] for c in COLUMNS}})
        # Grid: degraded | refs | output per mode | target | what references changed, for the targets
        # where references matter most; each row labelled with its GT-ID per mode.
        gain = values.get("1 reference", values[control])["gt_id"] - (
            blind["gt_id"] if blind is not None else 0
        )
        order = np.argsort(-gain, kind="stable")[: cfg.grid_samples]
        with_refs = [k for k in cfg.modes if k > 0]
        changed = sorted({min(with_refs), max(with_refs)}) if with_refs and 0 in cfg.modes else []
        labels = [mode_label(k) for k in cfg.modes]
        grid, row_labels = [], []
        for i in order:
            s = samples[i]
            outs_s = [outputs.get(k, {}).get(s["key"]) for k in cfg.modes]
            diffs = [change_map(outputs[k][s["key"]], outputs[0][s["key"]], gain=8.0) for k in changed]
            grid.append(
                [s["lq"], *(s["refs"][:3] + [None] * (3 - len(s["refs"][:3]))), *outs_s, s["gt"], *diffs]
            )
            row_labels.append(
                "ID " + "/".join(f"{values[lab]['gt_id'][i]:.2f}" for lab in labels if lab in values)
            )
        save_grid(
            out / f"grid_{name}.png",
            grid,
            title=(
                f"{name}: degraded | references | output with {'/'.join(map(str, cfg.modes))} references | target"
                + (" | |output with k refs - blind| x8" if changed else "")
                + f"; left: GT-ID per mode ({'/'.join(map(str, cfg.modes))} refs)"
            ),
            row_labels=row_labels,
            col_labels=[
                "degraded",
                "ref1",
                "ref2",
                "ref3",
                *[f"out {k} ref" for k in cfg.modes],
                "target",
                *[f"{k} ref - blind" for k in changed],
            ],
            cell=96,
        )
    bar.close()
    metrics = {
        "sets": results,
        "paired": paired,
        "not_computed": not_computed,
        "weights": wm.files,
        "config": {
            "steps": cfg.steps,
            "guidance": cfg.guidance,
            "samples": cfg.samples,
            "targets_with_refs": kmax,
        },
    }
    write_json(args.metrics, metrics)
    write_json(out / "per_target.json", targets)
    if args.report_grid:
        name = "severe" if "severe" in results else sorted(results)[0]
        write_bytes(args.report_grid, (out / f"grid_{name}.png").read_bytes())
    if args.real_photo:
        print(real_photo_figure(restorer, args.real_photo))
    write_bytes(
        args.report, markdown(results, paired, not_computed, "data/train/model", cfg.seed, wm.files).encode()
    )
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    with open(args.plot, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["set", "row", *COLUMNS])
        w.writeheader()
        w.writerows(plot_rows)
    sev = results.get("severe", next(iter(results.values())))
    d = paired.get("severe", next(iter(paired.values()))).get("1 reference", {}).get("gt_id")
    print(
        f"evaluate: {len(results)} sets x {len(cfg.modes)} modes + control on {sev['degraded input']['n']} paired targets; "
        f"severe PSNR {sev['degraded input']['psnr']:.2f} -> {sev.get('no reference', sev['degraded input'])['psnr']:.2f} dB (blind); "
        + (f"GT-ID 1 ref - blind {d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]; " if d else "")
        + f"report {args.report}"
    )


if __name__ == "__main__":
    main()
