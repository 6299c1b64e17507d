"""Evaluating one restorer on frozen evaluation sets: every row of a set on the same targets, paired
against the blind mode, and the grid and report of stage `evaluate`.

Rows per set: the degraded input (baseline), the front end alone where the model has one, each mode (no
reference, 1, 2, 3 references: the first k protocol references), and a control, "k references of another
person" (the same count as the largest mode, from the next target of another identity): true references
must beat it, or the model gains from more tokens rather than from who the references show. Each row's
difference to the blind mode carries a 95 % paired bootstrap interval (pipelines.stats, fixed seed).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.config import EvaluateConfig
from pipelines.evaluation import copy_score, cosine, embed, psnr_u8, ssim_u8
from pipelines.quality import LOWER_IS_BETTER, PER_TARGET, WeightMetrics
from pipelines.shards import decode_sample, iter_raw, shard_paths
from pipelines.stats import paired_bootstrap
from pipelines.viz import change_map, save_grid

COLUMNS = ("n", "psnr", "ssim", "ref_id_primary", "ref_id_evaluator", "gt_id", "copy_score", "copy_pairs")
PAIRED = ("gt_id", "psnr", "ssim", "copy_score")  # differences to the blind mode, with intervals
CONTROL = "{k} reference{s} of another person"
GATE_OPEN = "{mode} - gate open"  # a mode restored with the reference gate open (full weight)
GATED_VS_OPEN = "gated vs gate open"  # paired's entry: {mode: {metric: difference}}, the gate's effect
FRONT = "front end alone"  # ours: the stage-1 output (names must be valid MLflow metric keys)
FEW_STEPS = "no reference - {n} sampler step{s}"  # the blind mode with evaluate.front_probe_steps
BLIND_VS_FRONT = "blind vs front end"  # paired's entry: {blind row: {metric: difference}}


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


def row_means(values: dict[str, np.ndarray]) -> dict:
    """A row's means over its targets (the copy score over the targets whose reference has a conflict
    region, with their count)."""
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
            raise ValueError(
                f"no target of another identity with {k} references for {s['key']}; "
                "the control row needs at least two identities"
            )
    return out


def gate_lines(gate: dict) -> list[str]:
    """The report's paragraph on the reference gate (stages.evaluate.gate_restorer's record)."""
    g = gate["gate"] or {"sharp": None}
    if gate.get("reason"):
        return ["", f"References keep their full weight: no reference gate ({gate['reason']})."]
    sets = ", ".join(
        f"{k}: n = {v['n']}, median s {v['s_quantiles_10_50_90'][1]:.2f}, mean gain {v['mean_gain_1ref']:+.4f}"
        for k, v in gate["sets"].items()
    )
    if g["sharp"] is None:
        what = "full weight gains the validation targets at least as much as any gate: no gate (α = 1)"
    elif g["sharp"] == 0:
        what = "no threshold gains the validation targets anything: the gate is shut (α = 0)"
    else:
        what = f"s_sharp = {g['sharp']:.3f}, s_blurred = {g['blurred']:.3f}"
    totals = ""
    if gate.get("gain_gated") is not None:
        totals = (
            f"; total gain over the validation targets {gate['gain_gated']:+.3f} gated, "
            f"{gate['gain_open']:+.3f} at full weight"
        )
    if gate.get("mean_gain_gated"):
        totals += "; mean gain per set under the gate " + ", ".join(
            f"{k} {v:+.4f}" for k, v in gate["mean_gain_gated"].items()
        )
    return [
        "",
        "References are weighed by the reference gate (pipelines/reference_gate.py): the reference "
        "readout's Δ times α = clip((s_sharp − s) / (s_sharp − s_blurred), 0, 1), s = the degraded input's "
        "mean |Laplacian|; s_blurred = the lowest per-set median of s, s_sharp = the threshold that gives the "
        "validation targets the largest total gain among those under which no set's mean gain falls below "
        f"zero. Fitted on the validation split ({sets}; gain = GT-ID "
        f"with the primary encoder, 1 reference − blind, gate open; slope {gate['slope_per_log_s'] or 0:+.4f} "
        f"per log s{totals}): {what}. An input whose gate is shut (α = 0) is restored without its "
        "references, as in the blind mode. Rows marked “gate open” are the same modes with the references at "
        "full weight.",
    ]


def interval(d: dict, digits: int = 4) -> str:
    """A paired difference as the report prints it: mean [95 % interval], signed."""
    return f"{d['diff']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"


def gate_effect_lines(effect: dict | None) -> list[str]:
    """The report's table of the gate's own effect (paired_rows' GATED_VS_OPEN entry; none: no lines)."""
    if not effect:
        return []
    lines = [
        "",
        "The gate's own effect: the gated mode minus the same mode with the gate open (same targets):",
        "",
        "| mode | Δ GT-ID | verdict | Δ PSNR (dB) | verdict |",
        "|---|---:|---|---:|---|",
    ]
    for mode, d in effect.items():
        g, p = d["gt_id"], d["psnr"]
        lines.append(f"| {mode} | {interval(g)} | {g['verdict']} | {interval(p, 3)} | {p['verdict']} |")
    return lines


def blind_vs_front_lines(d: dict | None, steps: int) -> list[str]:
    """The report's paragraph on the blind mode against the front end alone (paired_rows' BLIND_VS_FRONT
    entry): the paired differences, and where a gap is, how much of it fewer sampler steps close."""
    if not d or "no reference" not in d:
        return []
    lines = [
        "",
        "The transformer against the front end alone: the blind mode minus the front end's output (same "
        "targets):",
        "",
        "| blind row | Δ PSNR (dB) | verdict | Δ GT-ID | verdict |",
        "|---|---:|---|---:|---|",
    ]
    for row, v in d.items():
        p, g = v["psnr"], v["gt_id"]
        label = f"{row} ({steps} sampler steps, the rows above)" if row == "no reference" else row
        lines.append(f"| {label} | {interval(p, 3)} | {p['verdict']} | {interval(g)} | {g['verdict']} |")
    full = d["no reference"]
    below = [m for m, name in (("psnr", "PSNR"), ("gt_id", "GT-ID")) if full[m]["verdict"] == "lower"]
    if not below:
        lines += ["", "The blind mode is at least as good as the front end alone here (PSNR and GT-ID)."]
        return lines
    few = [v for row, v in d.items() if row != "no reference"]
    why = (
        "The transformer does not earn its place in the blind mode here: it samples from the front end's "
        f"output and ends below it in {' and '.join('PSNR' if m == 'psnr' else 'GT-ID' for m in below)}."
    )
    if few and full["psnr"]["diff"] < 0:
        gap, short = full["psnr"]["diff"], few[0]["psnr"]["diff"]
        share = 1 - max(short, gap) / gap
        why += (
            f" With fewer sampler steps the PSNR gap is {short:+.3f} dB against {gap:+.3f} dB: "
            f"{share:.0%} of it is the sampler's trajectory (each step adds sampled detail that PSNR counts "
            "as error), the rest the model, a backbone that has learned no restoration beyond the front "
            "end's CNN it starts from (docs/results.md, “The blind mode and the front end”)."
        )
    return [*lines, "", why]


def markdown(
    results: dict,
    paired: dict,
    not_computed: dict,
    model: str,
    seed: int,
    files: dict | None = None,
    gate: dict | None = None,
    steps: int = 8,
) -> str:
    """reports/evaluation.md from the stage's results; `steps`: the sampler steps of its rows."""
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
    if gate:
        lines += gate_lines(gate)
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
            if row in ("true vs another person", GATED_VS_OPEN, BLIND_VS_FRONT):
                continue
            cells = ["—" if m not in d or d[m]["n"] == 0 else interval(d[m]) for m in paired_cols]
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {d['gt_id']['verdict']} |")
        lines += gate_effect_lines(paired[name].get(GATED_VS_OPEN))
        lines += blind_vs_front_lines(paired[name].get(BLIND_VS_FRONT), steps)
        c = paired[name].get("true vs another person")
        if c:
            lines += [
                "",
                f"Control: GT-ID with the true references minus with another person's ({c['rows'][0]}, same targets): "
                f"{interval(c)} — {c['verdict']}"
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


@dataclass
class SetResult:
    """One evaluation set: per-target values and outputs of every row, the targets, the control's label."""

    samples: list[dict]
    values: dict[str, dict[str, np.ndarray]]  # row -> metric -> (N,)
    outputs: dict[str, np.ndarray]  # row -> (N, H, W, 3) uint8
    control: str
    k_control: int


def gate_open_modes(restorer, cfg: EvaluateConfig) -> list[int]:
    """The modes also restored with the reference gate open (1 reference and the most), when the
    restorer has a gate (pipelines.reference_gate)."""
    if restorer.gate is None:
        return []
    return sorted({k for k in (1, max(cfg.modes)) if k in cfg.modes and k > 0})


def evaluate_set(
    restorer,
    root: str,
    name: str,
    cfg: EvaluateConfig,
    prim,
    evaluator,
    border: float,
    wm,
    progress=None,
    gate_modes: list[int] | None = None,
) -> SetResult:
    """Every row of set `name` under `root` restored by `restorer` on the same targets; `gate_modes`: the
    modes also restored with the reference gate open (None: `gate_open_modes(restorer, cfg)`)."""
    kmax = max(cfg.modes)
    samples, seen = load_set(root, name, cfg.samples, max(kmax, 1))
    if len(samples) < 2:
        raise ValueError(
            f"evaluation set {name} in {root} has {len(samples)} targets with {max(kmax, 1)} references "
            f"(of {seen}); need at least 2 for a paired comparison"
        )

    def restore(lqs, refs, gate=None, blind=None):
        return restorer.restore_in_batches(lqs, refs, cfg.batch_size, gate, blind=blind)

    def measure(row: str, outs: np.ndarray) -> None:
        values[row] = per_target(outs, samples, prim, evaluator, cfg.copy_tau, border, wm)
        outputs[row] = outs

    lq = [s["lq"] for s in samples]
    values: dict[str, dict] = {}
    outputs: dict[str, np.ndarray] = {}
    measure("degraded input", np.stack(lq))
    front = restorer.front_only(lq)
    if front is not None:  # stage 1 alone: what the transformer adds is the difference to it
        measure(FRONT, front)
    for k in cfg.modes:  # chunks the gate shuts entirely are the blind mode's (restore_in_batches)
        measure(
            mode_label(k), restore(lq, [s["refs"][:k] for s in samples], blind=outputs.get(mode_label(0)))
        )
        if progress is not None:
            progress.update(1)
    n = cfg.front_probe_steps
    if front is not None and 0 in cfg.modes and n:  # where the blind mode's gap to the front end comes from
        blind_few = restorer.restore_in_batches(lq, [[] for _ in samples], cfg.batch_size, steps=n)
        measure(FEW_STEPS.format(n=n, s="s" if n > 1 else ""), blind_few)
    if gate_modes is None:
        gate_modes = gate_open_modes(restorer, cfg)
    for k in gate_modes:  # the same modes with the reference gate open: its effect
        measure(GATE_OPEN.format(mode=mode_label(k)), restore(lq, [s["refs"][:k] for s in samples], False))
        if progress is not None:
            progress.update(1)
    k_ctl = max(kmax, 1)
    pool = samples if not cfg.samples else load_set(root, name, 0, k_ctl)[0]
    control = CONTROL.format(k=k_ctl, s="s" if k_ctl > 1 else "")
    measure(control, restore(lq, other_person(samples, pool, k_ctl)))
    if progress is not None:
        progress.update(1)
    # the rows' order as the report has always had it: degraded, front, modes, control
    return SetResult(samples, values, outputs, control, k_ctl)


def targets_record(res: SetResult) -> dict:
    """A set's entry of `per_target.json`: the target keys, a digest of what was evaluated (each target's
    degraded input, references and ground truth: a set re-made with another seed has the same keys and
    other pixels), and the per-target values of the paired metrics per row."""
    h = hashlib.sha256()
    for s in res.samples:
        h.update(s["key"].encode())
        for img in (s["lq"], s["gt"], *s["refs"]):
            h.update(np.ascontiguousarray(img).tobytes())
    return {
        "keys": [s["key"] for s in res.samples],
        "content": h.hexdigest(),
        "rows": {
            row: {m: [round(float(x), 5) for x in v[m]] for m in PAIRED} for row, v in res.values.items()
        },
    }


def paired_rows(res: SetResult, cols: tuple[str, ...], seed: int) -> dict:
    """Every row's paired difference to the blind mode per metric, and true vs another person."""
    blind = res.values.get("no reference")
    paired: dict = {}
    for row, v in res.values.items():
        if blind is None or row in ("no reference",):
            continue
        paired[row] = {}
        for m in cols:
            r = paired_bootstrap(v[m], blind[m], seed=seed)
            paired[row][m] = {**r.as_dict(), "verdict": r.verdict}
    gated = {mode: row for mode in res.values if (row := GATE_OPEN.format(mode=mode)) in res.values}
    if gated:  # the gate's own effect: the default (gated) against the same mode with the gate open
        paired[GATED_VS_OPEN] = {}
        for mode, row in gated.items():
            paired[GATED_VS_OPEN][mode] = {}
            for m in ("gt_id", "psnr"):
                r = paired_bootstrap(res.values[mode][m], res.values[row][m], seed=seed)
                paired[GATED_VS_OPEN][mode][m] = {**r.as_dict(), "verdict": r.verdict}
    if FRONT in res.values and blind is not None:  # the transformer against the front end alone
        front = res.values[FRONT]
        paired[BLIND_VS_FRONT] = {}
        for row in [r for r in res.values if r == "no reference" or r.startswith("no reference - ")]:
            paired[BLIND_VS_FRONT][row] = {}
            for m in ("psnr", "gt_id"):
                r = paired_bootstrap(res.values[row][m], front[m], seed=seed)
                paired[BLIND_VS_FRONT][row][m] = {**r.as_dict(), "verdict": r.verdict}
    true_label = mode_label(res.k_control)
    if true_label in res.values:
        d = paired_bootstrap(res.values[true_label]["gt_id"], res.values[res.control]["gt_id"], seed=seed)
        paired["true vs another person"] = {
            "rows": [true_label, res.control],
            **d.as_dict(),
            "verdict": d.verdict,
        }
    return paired


def save_set_grid(path: Path, name: str, res: SetResult, modes: tuple[int, ...], n: int) -> None:
    """degraded | refs | output per mode | target | what references changed, for the `n` targets where
    references matter most; each row labelled with its GT-ID per mode."""
    values, samples = res.values, res.samples
    blind = values.get("no reference")
    outputs = {k: {s["key"]: o for s, o in zip(samples, res.outputs[mode_label(k)])} for k in modes}
    gain = values.get("1 reference", values[res.control])["gt_id"] - (
        blind["gt_id"] if blind is not None else 0
    )
    order = np.argsort(-gain, kind="stable")[:n]
    with_refs = [k for k in modes if k > 0]
    changed = sorted({min(with_refs), max(with_refs)}) if with_refs and 0 in modes else []
    labels = [mode_label(k) for k in modes]
    grid, row_labels = [], []
    for i in order:
        s = samples[i]
        outs_s = [outputs.get(k, {}).get(s["key"]) for k in modes]
        diffs = [change_map(outputs[k][s["key"]], outputs[0][s["key"]], gain=8.0) for k in changed]
        grid.append([s["lq"], *(s["refs"][:3] + [None] * (3 - len(s["refs"][:3]))), *outs_s, s["gt"], *diffs])
        row_labels.append(
            "ID " + "/".join(f"{values[lab]['gt_id'][i]:.2f}" for lab in labels if lab in values)
        )
    save_grid(
        path,
        grid,
        title=(
            f"{name}: degraded | references | output with {'/'.join(map(str, modes))} references | target"
            + (" | |output with k refs - blind| x8" if changed else "")
            + f"; left: GT-ID per mode ({'/'.join(map(str, modes))} refs)"
        ),
        row_labels=row_labels,
        col_labels=[
            "degraded",
            "ref1",
            "ref2",
            "ref3",
            *[f"out {k} ref" for k in modes],
            "target",
            *[f"{k} ref - blind" for k in changed],
        ],
        cell=96,
    )
