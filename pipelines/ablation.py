"""The ablation: Table 3's IConFace variants, seed 002's and RefSTAR's rows, trained under one budget and
measured under one protocol, and the report that compares them paired on the same targets.

One protocol for every row (`protocol`): the same validation targets, degradations and references; ID-GT
with references and blind; the wrong-person control (`control_batch`: each target restored with as many
references of the next validation target of another identity; true − other with a paired interval); the
copy score in conflict regions (pipelines.evaluation.copy_score on the first reference's conflict mask
where the shards carry one: the share of conflict pixels the output takes from the reference rather than
from the target; lower is better). `report` writes the markdown and the metrics of stage `ablate`.
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.batches import to_uint8
from pipelines.config import DEFAULT_ROW, VARIANT_NAMES, AblateConfig, TrainConfig
from pipelines.network import reference_readout
from pipelines.stats import paired_bootstrap
from pipelines.validation import no_refs, psnr

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
    """Per-target ID-GT with references, blind and with the control's references (and of any other
    restoration in `known`, by its key), and the copy score in the first reference's conflict region
    (NaN where none) of the output with references and of the blind one."""
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
    gt_u8, ref_u8 = to_uint8(batch["gt"]), to_uint8(batch["refs"][:, 0])
    for key, row in (("copy", "ref"), ("copy_blind", "none")):  # blind: what the target alone gives
        out_u8, copies = to_uint8(outs[row]), []
        for i, m in enumerate(masks):
            c = (
                None
                if m is None or not bool(batch["ref_mask"][i, 0])
                else copy_score(out_u8[i], gt_u8[i], ref_u8[i], m, tau)
            )
            copies.append(np.nan if c is None else c)
        per[key] = np.array(copies, np.float64)
    return per


# Each seed system's row is paired against the same fine-tune without its addition, and what its paper
# claims: (system, claim, the per-target measure of `protocol`, the direction the paper reports).
ADDON_BASELINES: dict[str, str] = {
    "composite": DEFAULT_ROW,
    "composite_ensemble": "composite",
    "refstar_in_context": DEFAULT_ROW,
    "refstar_decoupled": "refstar_in_context",
    "refstar_decoupled_cycle": "refstar_decoupled",
}
CLAIMS: dict[str, tuple[str, str, str, str]] = {
    "composite": (
        "seed 002, Composite Context (arXiv:2505.21905)",
        "its context tokens restore identity better than IConFace's tokens: ID-GT with references",
        "ref",
        "higher",
    ),
    "composite_ensemble": (
        "seed 002, eq. 6",
        "the training-free multi-reference ensemble raises ID-GT over one pass",
        "ref",
        "higher",
    ),
    "refstar_in_context": (
        "RefSTAR, conflict masks (arXiv:2507.10470)",
        "masking conflicting reference tokens copies less from the reference in conflict regions: copy score",
        "copy",
        "lower",
    ),
    "refstar_decoupled": ("RefSTAR, eq. 4", "the decoupled cross-attention raises ID-GT", "ref", "higher"),
    "refstar_decoupled_cycle": (
        "RefSTAR, eqs. 5 and 7",
        "the cycle-consistency loss raises ID-GT",
        "ref",
        "higher",
    ),
}


def baselines(names: list[str]) -> dict[str, str | None]:
    """Each row's baseline: the previous IConFace variant of Table 3's order for its rows, the same
    fine-tune without the addition for the seed systems' rows (None: not among the rows)."""
    out: dict[str, str | None] = {}
    previous = None
    for v in names:
        if v in VARIANT_NAMES:
            out[v], previous = previous, v
        else:
            out[v] = ADDON_BASELINES[v] if ADDON_BASELINES.get(v) in names else None
    return out


def finetune_problems(tcfg: TrainConfig) -> list[str]:
    """Why the trained default cannot be the fine-tune protocol's base (empty: it can). The protocol pairs
    the seed systems' rows against `full` and removes parts from it for Table 3's rows, so the default
    must be plain IConFace `full`: no other variant, conditioning, masks, route or cycle loss."""
    r = tcfg.refstar
    checks = [
        (tcfg.variant == "full", f"train.variant is {tcfg.variant!r}, not 'full'"),
        (tcfg.conditioning == "iconface", f"train.conditioning is {tcfg.conditioning!r}, not 'iconface'"),
        (r.reference_masks == "none", f"train.refstar.reference_masks is {r.reference_masks!r}, not 'none'"),
        (r.reference_route == "in_context", f"train.refstar.reference_route is {r.reference_route!r}"),
        (not r.cycle_loss, "train.refstar.cycle_loss is on"),
    ]
    return [why for ok, why in checks if not ok]


def table3_without_readout(cfg: AblateConfig, tcfg: TrainConfig) -> bool:
    """Whether Table 3's rows run in the paper's head, the default's reference readout left out
    (`ablate.table3_readout: off`); only where the default has the readout, else `full` is `default`."""
    return cfg.table3_readout == "off" and reference_readout(tcfg)


def _protocol_text(cfg: AblateConfig, tcfg: TrainConfig, init: str | None) -> list[str]:
    """The paragraph that states how every row was trained."""
    readout = reference_readout(tcfg)
    table3_off = table3_without_readout(cfg, tcfg)
    where = " (off in Table 3's rows)" if table3_off else ""
    common = (
        f"batch {cfg.batch_size}, backbone `{tcfg.backbone}`, prediction `{tcfg.prediction}`, reference "
        f"readout {'on' if readout else 'off'}{where}"
    )
    if cfg.protocol == "scratch":
        return [f"Protocol `scratch`: each row trains from seed {cfg.seed} for {cfg.steps} steps ({common})."]
    head = (
        " in the paper's head: the default's reference readout (ours, `ref_fuse`) is left out of each of "
        "them (`ablate.table3_readout`), since it carries the references past the pathways those rows remove "
        "(with it, no step of the order resolved: docs/results.md, “The ablation”)"
        if table3_off
        else ""
    )
    return [
        f"Protocol `finetune`: each row starts from the trained default (`{init}`: variant `{tcfg.variant}`, "
        f"{tcfg.max_steps} steps) and trains {cfg.steps} more steps on the same degradation stream (seed "
        f"{cfg.seed}, {common}; lr {cfg.lr:g}, linear warm-up over {cfg.warmup_steps} steps, then cosine to 0). "
        "A row differs from its baseline by one change. Table 3's rows are the default with parts removed "
        "(their weights left out; `single_route`'s one memory route starts with both routes' queries, "
        f"models/iconface.py `adapt_pathways`){head}: what each part contributes to the trained model once the "
        f"rest has had {cfg.steps} steps to adapt, not a model trained without it. `{DEFAULT_ROW}` is the "
        "trained default fine-tuned as it is. The seed systems' rows add their "
        "modules to the default (new weights start at their initialisation; RefSTAR's reference K/V "
        f"up-projections at zero) and are paired against the same fine-tune without the addition (`{DEFAULT_ROW}`, "
        "or the row they add to: the ensemble to `composite`, the decoupled route to the masked in-context row, "
        "the cycle loss to the decoupled row): their new weights have "
        f"had {cfg.steps} steps, the default's {tcfg.max_steps + cfg.steps}, so a row below its baseline may be "
        "a row not trained enough rather than a worse method.",
    ]


def _init_lines(results: dict) -> list[str]:
    """Which pathway modules each row left out of the default and which it starts fresh."""
    rows = [(v, m["init"]) for v, m in results.items() if m.get("init")]
    if not rows:
        return []

    def names(d: dict) -> str:
        return ", ".join(f"`{k}` ({n})" for k, n in d.items()) or "—"

    lines = [
        "",
        "| row | left out of the default (weights) | new, from initialisation (weights) |",
        "|---|---|---|",
    ]
    return lines + [f"| {v} | {names(i['left_out'])} | {names(i['fresh'])} |" for v, i in rows]


def report(
    results: dict,
    extra: dict,
    cfg: AblateConfig,
    tcfg: TrainConfig,
    targets: int,
    masks: dict | None,
    tau: float,
    init: str | None = None,
) -> tuple[str, dict]:
    """(markdown, metrics) of the ablation: the table of every row (`results`: fit's metrics per row), each
    row paired against its baseline (Table 3's steps; the seed systems' verdicts) and the one protocol per
    row, from `extra` (per row, the per-target arrays of `protocol`); `masks`: the RefSTAR
    rows' mask option and provenance, or None; `init`: the model folder the fine-tunes start from."""
    lq = next(iter(results.values()))
    names = list(results)
    lines = [
        "# Ablation of IConFace's parts (paper Table 3 layout), seed 002 and RefSTAR under one protocol",
        "",
        "Wall-clock training times are in the MLflow runs (`ablate/<variant>`), not here: this file is a DVC output "
        "and must be byte-identical on a rerun.",
        "",
        *_protocol_text(cfg, tcfg, init),
        "",
        f"Every row is evaluated on the same {targets} validation targets degraded with `{tcfg.val_preset}` "
        f"({cfg.val_steps} sampler steps). ID-GT: cosine to the target with the evaluator encoder. Degraded input: "
        f"PSNR {lq['lq_psnr']:.2f} dB, ID-GT {lq['lq_id_sim']:.4f}. MLflow: the `ablate` run of experiment "
        f"`{tcfg.experiment}`."
        + (
            f" RefSTAR rows: conflict masks `{masks['option']}` "
            f"({', '.join(f'{k} {n}' for k, n in masks['provenance'].items())} masks in the train split)."
            if masks
            else ""
        ),
        *_init_lines(results),
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
    base = baselines(names)
    paired_lines, paired = _paired_steps(names, base, extra, cfg.seed, targets)
    verdict_lines, verdicts = _verdicts(names, base, extra, cfg.seed)
    proto_lines, proto = _protocol_rows(names, extra, cfg.seed, targets, tau)
    lines += paired_lines + verdict_lines + proto_lines
    metrics = {
        v: {
            **{k: m[k] for k, _ in COLUMNS},
            **({"init": m["init"]} if m.get("init") else {}),
            "paired": paired[v],
            "protocol": proto[v],
            **({"claim": verdicts[v]} if v in verdicts else {}),
        }
        for v, m in results.items()
    }
    return "\n".join(lines) + "\n", metrics


def _paired_steps(
    names: list[str], base: dict, extra: dict, seed: int, targets: int
) -> tuple[list[str], dict]:
    """Each row against its baseline on the same targets: ID-GT with references after the fine-tune and,
    where both rows have it, as loaded (before the first step: a knock-out of the trained default), and
    PSNR, 95 % bootstrap intervals; and which of Table 3's steps hold."""
    paired = {}
    lines = [
        "",
        f"Each row against its baseline on the same {targets} targets (mean [95 % bootstrap interval], seed "
        f"{seed}); an interval that contains 0 is no difference. Baseline: the previous variant of Table 3's "
        "order for IConFace's rows; the same fine-tune without the addition for the seed systems' rows. "
        "“As loaded”: both rows restored before their first step (the default with the part removed or "
        "added, no adaptation).",
        "",
        "| variant | baseline | Δ ID-GT (refs) | verdict | Δ ID-GT as loaded | verdict | Δ PSNR (refs) dB | verdict |",
        "|---|---|---:|---|---:|---|---:|---|",
    ]
    for v in names:
        b = base[v]
        if b is None:
            paired[v] = None
            lines.append(f"| {v} | — | — | — | — | — | — | — |")
            continue
        d = paired_bootstrap(extra[v]["ref"], extra[b]["ref"], seed=seed)
        q = paired_bootstrap(extra[v]["ref_psnr"], extra[b]["ref_psnr"], seed=seed)
        paired[v] = {
            "vs": b,
            "id_gt": {**d.as_dict(), "verdict": d.verdict},
            "psnr": {**q.as_dict(), "verdict": q.verdict},
        }
        loaded = "— | —"
        if "ref_as_loaded" in extra[v] and "ref_as_loaded" in extra[b]:
            a = paired_bootstrap(extra[v]["ref_as_loaded"], extra[b]["ref_as_loaded"], seed=seed)
            paired[v]["id_gt_as_loaded"] = {**a.as_dict(), "verdict": a.verdict}
            loaded = f"{a.text()} | {a.verdict}"
        lines.append(f"| {v} | {b} | {d.text()} | {d.verdict} | {loaded} | {q.text(3)} | {q.verdict} |")
    steps = [v for v in names if v in VARIANT_NAMES and paired[v]]

    def held(key: str) -> tuple[str, str]:
        on = [v for v in steps if key in paired[v]]
        yes = [f"{base[v]} < {v}" for v in on if paired[v][key]["verdict"] == "higher"]
        no = [
            f"{base[v]} vs {v}: {paired[v][key]['verdict']}"
            for v in on
            if paired[v][key]["verdict"] != "higher"
        ]
        return ", ".join(yes) or "no step", ", ".join(no) or "none"

    holds, not_held = held("id_gt")
    lines += [
        "",
        "The paper's order (Table 3) is concat < +struct < +id < single_route < full on ID-GT.",
        f"Holds here (interval clear of zero): {holds}.",
        f"Does not hold (no difference or reversed): {not_held}.",
    ]
    if any("id_gt_as_loaded" in paired[v] for v in steps):
        holds, not_held = held("id_gt_as_loaded")
        lines.append(f"As loaded, before any step: holds: {holds}; does not hold: {not_held}.")
    return lines, paired


def _verdicts(names: list[str], base: dict, extra: dict, seed: int) -> tuple[list[str], dict]:
    """One verdict per seed system's row: its paper's claim, the paired difference against its baseline on
    the claim's measure, and whether the interval shows it (clear of zero in the claimed direction)."""
    rows = [v for v in names if v in CLAIMS and base[v]]
    if not rows:
        return [], {}
    lines = [
        "",
        "## The seed systems: each claim against its baseline",
        "",
        "| row | system | claim | baseline | Δ (row − baseline) | pairs | verdict | measured reason |",
        "|---|---|---|---|---:|---:|---|---|",
    ]
    out = {}
    for v in rows:
        system, claim, measure, direction = CLAIMS[v]
        d = paired_bootstrap(extra[v][measure], extra[base[v]][measure], seed=seed)
        verdict = (
            "shown"
            if d.verdict == direction
            else "not shown: no difference"
            if d.verdict == "no difference"
            else f"not shown: {d.verdict}"
        )
        diff = d.as_dict() if d.n else {"diff": None, "lo": None, "hi": None, "n": 0}
        reason = "" if verdict == "shown" else _reason(extra[v], extra[base[v]], measure, seed)
        out[v] = {"measure": measure, "direction": direction, **diff, "verdict": verdict, "reason": reason}
        lines.append(
            f"| {v} | {system} | {claim} ({direction}) | {base[v]} | {d.text() if d.n else '—'} | {d.n} | "
            f"{verdict} | {reason or '—'} |"
        )
    return lines, out


def _reason(row: dict, base: dict, measure: str, seed: int) -> str:
    """What the protocol measured that explains a claim not shown: for an identity claim, whether the row
    reads its references at all (refs − blind) and whether it reads them less than its baseline (the
    difference of the two reference effects, paired); for the copy claim, whether the baseline copies
    anything beyond its blind output for the masks to remove."""
    if measure == "copy":
        c = paired_bootstrap(base["copy"], base["copy_blind"], seed=seed)
        if c.verdict != "higher":
            return (
                f"the baseline copies no more than its blind output in conflict regions (copy refs − blind "
                f"{c.text()}): nothing for the masks to remove"
            )
        return f"the baseline copies (copy refs − blind {c.text()}) and the masks leave it as it is"
    own = paired_bootstrap(row["ref"], row["none"], seed=seed)
    if own.verdict != "higher":
        return f"the row does not read its references: refs − blind {own.text()}"
    e = paired_bootstrap(row["ref"] - row["none"], base["ref"] - base["none"], seed=seed)
    if e.verdict == "lower":
        return f"it reads its references less than its baseline: refs − blind {e.text()} below the baseline's"
    return f"its reference effect is its baseline's (refs − blind, row − baseline: {e.text()})"


def _protocol_rows(
    names: list[str], extra: dict, seed: int, targets: int, tau: float
) -> tuple[list[str], dict]:
    """The one protocol per row: references − blind, true − another person, the copy score (and its
    difference to the blind output's)."""
    proto = {}
    lines = [
        "",
        "## One protocol for every row",
        "",
        f"On the same {targets} targets: ID-GT with references − blind; with the true references − "
        "with as many references of another person (the next validation target of another identity); the "
        f"copy score in the first reference's conflict region (τ = {tau:g}; the share of conflict pixels taken "
        "from the reference rather than the target, lower is better; mean over the targets whose reference has "
        "a conflict region), with references and its difference to the blind output's (what the model copies "
        "beyond what the target alone gives). Intervals: 95 % paired bootstrap, seed "
        f"{seed}; an interval that contains 0 is no difference.",
        "",
        "| row | refs − blind | verdict | true − other person | verdict | copy (conflict) ↓ | copy refs − blind | pairs |",
        "|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for v in names:
        per = extra[v]
        gain = paired_bootstrap(per["ref"], per["none"], seed=seed)
        ok = np.isfinite(per["control"])
        ctl = paired_bootstrap(per["ref"][ok], per["control"][ok], seed=seed)
        copies = per["copy"][np.isfinite(per["copy"])]
        copy = round(float(copies.mean()), 4) if len(copies) else None
        beyond = paired_bootstrap(per["copy"], per["copy_blind"], seed=seed)
        proto[v] = {
            "ref_minus_blind": {**gain.as_dict(), "verdict": gain.verdict},
            "true_minus_other": {**ctl.as_dict(), "verdict": ctl.verdict},
            "control_id_sim": round(float(per["control"][ok].mean()), 4) if ok.any() else None,
            "copy_score": copy,
            "copy_minus_blind": {**beyond.as_dict(), "verdict": beyond.verdict} if beyond.n else None,
            "copy_pairs": int(len(copies)),
        }
        lines.append(
            f"| {v} | {gain.text()} | {gain.verdict} | "
            f"{ctl.text()} | {ctl.verdict} | "
            f"{'—' if copy is None else f'{copy:.4f}'} | {beyond.text() if beyond.n else '—'} | {len(copies)} |"
        )
    helps = [v for v in names if proto[v]["true_minus_other"]["verdict"] == "higher"]
    lines += [
        "",
        f"Rows whose true references beat another person's (interval clear of zero): {', '.join(helps) or 'none'}.",
    ]
    return lines, proto
