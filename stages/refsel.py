"""Stage `refsel`: train the RefSel-style mask U-Net on the annotations, predict every pair, route
doubtful pairs back to review, and write shards whose masks are `annotated` or `predicted`.

    python -m stages.refsel --shards data/shards --annotate data/annotate --out data/refsel \
        --metrics metrics/refsel.json --plot plots/refsel_loss.csv

* Training pairs: the winning annotations of `annotate` (data/annotate/masks), input
  [degraded target, reference] with the target degraded once per pair by `refsel.preset`.
* Report (RefSTAR Table 3 layout): accuracy, conflict IoU/precision/recall per conflict scenario on the
  test split's pairs, against the synthetic ground truth where the shards have it, next to the trivial
  "no conflict anywhere" baseline; `report.md`, `predictions.png`.
* Review: pairs of the annotated split that nobody annotated and whose mean confidence is below
  `refsel.review_confidence` (lowest first, at most `review_max`) are listed in `review.jsonl`; with
  `annotate.backend: label_studio` they are pushed as tasks with the prediction attached (model version
  `refsel-<sha>`), so the next `annotate` run pulls their corrections.
* Shards (`data/refsel/shards`, the contract of docs/architecture.md): every reference gets `refmask{i}.png`,
  provenance `annotated` (the winning annotation) or `predicted` (this model) in meta.json, plus
  `mask_model`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from pipelines.config import as_dict
from pipelines.images import png_bytes
from pipelines.io import read_jsonl, write_bytes, write_json, write_jsonl
from pipelines.pairs import SPLITS
from pipelines.refsel import (
    confidence,
    degraded_target,
    iter_pairs,
    pair_content,
    pair_key,
    per_type_report,
    predict,
    predicted_masks,
    save_model,
    to_tensor,
    train,
)
from pipelines.shards import (
    FORMAT_VERSION,
    INDEX_NAME,
    iter_raw,
    shard_paths,
    validate_shards,
    write_split,
)
from pipelines.viz import mask_overlay, save_grid
from stages._common import load_params, parser, progress_enabled, setup_logging

TABLE_TYPES = ("mouth", "eyes", "glasses", "beard", "none", "all")


def load_mask(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def report_markdown(model: dict, baseline: dict, version: str) -> str:
    lines = [
        f"# RefSel mask model {version}: accuracy per conflict scenario (test split, RefSTAR Table 3 layout)",
        "",
        "Accuracy: consistent-vs-conflict pixel accuracy on the ground truth's face pixels, mean over pairs. "
        "IoU / precision / recall: of the conflict class, pooled over pixels. Baseline: predict no conflict anywhere.",
        "",
        "| scenario | pairs | accuracy | conflict IoU | precision | recall | ignore acc. | baseline acc. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in TABLE_TYPES:
        if k not in model:
            continue
        m, b = model[k], baseline.get(k, {})
        lines.append(
            f"| {k} | {m['pairs']} | {m['accuracy']:.4f} | {m['conflict_iou']:.4f} | {m['conflict_precision']:.4f} | "
            f"{m['conflict_recall']:.4f} | {m['ignore_accuracy']:.4f} | {b.get('accuracy', float('nan')):.4f} |"
        )
    return "\n".join(lines) + "\n"


def decided_annotations(ann: Path, shards: str) -> tuple[dict, dict, dict]:
    """(decisions by pair key, pairs per split, pairs by key): the annotations that won, each checked to
    name a pair of `shards` drawn on the pixels the shards show now."""
    decisions = {d["pair_key"]: d for d in read_jsonl(ann / "decisions.jsonl")}
    if not decisions:
        raise SystemExit(
            f"error: {ann}/decisions.jsonl has no decided annotations to train on; run annotate first"
        )
    pairs = {s: list(iter_pairs(shards, s)) for s in SPLITS}
    by_key = {q.key: q for s in SPLITS for q in pairs[s]}
    gone = [k for k in decisions if k not in by_key]
    if gone:
        raise SystemExit(
            f"error: annotated pair {gone[0]} is not in {shards}; re-run annotate on these shards"
        )
    stale = [k for k in sorted(decisions) if decisions[k].get("content") != pair_content(by_key[k])]
    if stale:
        raise SystemExit(
            f"error: the decided annotation of {stale[0]} (and {len(stale) - 1} more) was drawn on other images "
            f"than {shards} shows for that pair (content {decisions[stale[0]].get('content') or 'not recorded'}, "
            f"now {pair_content(by_key[stale[0]])}); re-run annotate on these shards"
        )
    return decisions, pairs, by_key


def predict_pairs(model, pairs: dict, cfg) -> tuple[dict, dict]:
    """(predicted mask, confidence) of every pair of every split."""
    pred_masks, conf = {}, {}
    for s in SPLITS:
        if not pairs[s]:
            continue
        probs = predict(
            model,
            to_tensor([degraded_target(q, cfg.preset, cfg.seed) for q in pairs[s]]),
            to_tensor([q.ref for q in pairs[s]]),
        )
        for q, m, c in zip(pairs[s], predicted_masks(probs), confidence(probs).tolist()):
            pred_masks[q.key], conf[q.key] = m, c

    return pred_masks, conf


def push_review(review: list[dict], by_key: dict, pred_masks: dict, acfg, version: str) -> int:
    """The review queue as Label Studio tasks with the predictions attached; returns how many were pushed."""
    if not review:
        return 0
    from label_studio_sdk.core.api_error import ApiError

    from annotation.project import (
        STORAGE_DIR,
        LabelStudioError,
        PairTask,
        connect,
        ensure_project,
        push_predictions,
        push_tasks,
    )

    try:
        client = connect()
        media = Path(acfg.media_root)
        tasks = []
        for r in review:
            q = by_key[r["pair_key"]]
            content = pair_content(q)
            gt, rf = (f"{STORAGE_DIR}/{q.key}_{content}_{part}.png" for part in ("gt", "ref"))
            for rel, img in ((gt, q.gt), (rf, q.ref)):
                write_bytes(media / rel, png_bytes(img))
            tasks.append(PairTask(q.key, q.target, q.reference, q.ref_index, gt, rf, content))
        project = ensure_project(client, acfg.project, media)
        ids = push_tasks(client, project.id, tasks, media)
        pushed = push_predictions(
            client,
            ids,
            {r["pair_key"]: pred_masks[r["pair_key"]] for r in review},
            version,
            {r["pair_key"]: r["confidence"] for r in review},
        )
    except LabelStudioError as exc:
        raise SystemExit(f"error: {exc}") from exc
    except ApiError as exc:
        raise SystemExit(f"error: Label Studio answered HTTP {exc.status_code}: {exc.body}") from exc

    return pushed


def write_mask_shards(shards: str, out: Path, annotated: dict, pred_masks: dict, version: str) -> dict:
    """The shards again with each reference's mask: annotated where a decision exists, else predicted;
    returns the count of each."""
    shards_out = out / "shards"
    shards_out.mkdir(exist_ok=True)
    for old in shards_out.glob("*.tar"):
        old.unlink()
    provenance_counts = {"annotated": 0, "predicted": 0}

    def samples(split: str):
        for raw in iter_raw(shard_paths(shards, split)):
            meta = json.loads(raw["meta.json"])
            s = {k: v for k, v in raw.items() if not k.startswith("refmask")}
            prov = []
            for i, rid in enumerate(meta["refs"]):
                k = pair_key(meta["target"], rid)
                if k in annotated:
                    m, src = annotated[k], "annotated"
                else:
                    m, src = pred_masks[k], "predicted"
                s[f"refmask{i}.png"] = png_bytes(m)
                prov.append(src)
                provenance_counts[src] += 1
            meta["mask_provenance"] = prov
            meta["mask_model"] = version
            s["meta.json"] = json.dumps(meta, sort_keys=True).encode()
            yield s

    src_index = json.loads((Path(shards) / INDEX_NAME).read_text())
    index = {
        "format_version": FORMAT_VERSION,
        "config": src_index["config"],
        "encoder": src_index["encoder"],
        "splits": {},
    }
    for split in SPLITS:
        entries = write_split(shards_out, split, samples(split), src_index["config"]["samples_per_shard"])
        index["splits"][split] = {"samples": sum(e["samples"] for e in entries), "shards": entries}
    index["mask_model"] = version
    write_json(shards_out / INDEX_NAME, index)
    validate_shards(shards_out)

    return provenance_counts


def save_predictions(out: Path, show: list, pred_masks: dict, cfg, version: str) -> None:
    """target | degraded | reference | predicted mask | ground truth for the pairs in `show`."""
    rows = [
        [
            q.gt,
            degraded_target(q, cfg.preset, cfg.seed),
            q.ref,
            mask_overlay(q.ref, pred_masks[q.key]),
            mask_overlay(q.ref, q.truth) if q.truth is not None else None,
        ]
        for q in show
    ]
    if rows:
        save_grid(
            out / "predictions.png",
            rows,
            title=f"{version}: target | degraded | reference | predicted mask | ground truth",
            col_labels=["target", "degraded", "reference", "predicted", "truth"],
            row_labels=[",".join(q.kinds) or "none" for q in show],
            cell=96,
        )


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    for a in ("--shards", "--annotate", "--out", "--metrics", "--plot"):
        p.add_argument(a, required=True)
    args = p.parse_args(argv)
    setup_logging()
    cfgs = load_params(args.params, "refsel", "annotate")
    cfg, acfg = cfgs["refsel"], cfgs["annotate"]
    torch.set_num_threads(cfg.threads)
    validate_shards(args.shards)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ann = Path(args.annotate)

    decisions, pairs, by_key = decided_annotations(ann, args.shards)
    keys = sorted(decisions)
    annotated = {k: load_mask(ann / "masks" / f"{k}.png") for k in keys}
    lq = to_tensor([degraded_target(by_key[k], cfg.preset, cfg.seed) for k in keys])
    ref = to_tensor([by_key[k].ref for k in keys])
    masks = torch.from_numpy(np.stack([annotated[k] for k in keys]))
    model, history = train(lq, ref, masks, cfg, progress=progress_enabled())
    version = save_model(model, out / "model.safetensors", {"trained_on": len(keys)})
    with open(args.plot, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "loss"])
        w.writerows([i, round(v, 6)] for i, v in enumerate(history))

    pred_masks, conf = predict_pairs(model, pairs, cfg)

    # ---- report (Table 3 layout) --------------------------------------------------------------------
    test = [q for q in pairs["test"] if q.truth is not None and q.truth_provenance == "synthetic"]
    table = per_type_report(test, np.stack([pred_masks[q.key] for q in test])) if test else {}
    baseline = (
        per_type_report(test, np.stack([np.where(q.truth == 255, 255, 0).astype(np.uint8) for q in test]))
        if test
        else {}
    )
    write_bytes(out / "report.md", report_markdown(table, baseline, version).encode())

    # ---- review queue ------------------------------------------------------------------------------
    candidates = sorted(
        (c, q.key)
        for q in pairs.get(acfg.split, [])
        if q.key not in decisions and (c := conf[q.key]) < cfg.review_confidence
    )[: cfg.review_max]
    review = [{"pair_key": k, "confidence": round(c, 4), "model_version": version} for c, k in candidates]
    write_jsonl(out / "review.jsonl", review)
    pushed = push_review(review, by_key, pred_masks, acfg, version) if acfg.backend == "label_studio" else 0
    provenance_counts = write_mask_shards(args.shards, out, annotated, pred_masks, version)
    show = test[: cfg.grid_samples] if test else pairs["train"][: cfg.grid_samples]
    save_predictions(out, show, pred_masks, cfg, version)

    all_conf = np.array(list(conf.values()))
    metrics = {
        "model_version": version,
        "trained_on": len(keys),
        "final_loss": round(history[-1], 5) if history else None,
        "per_type": table,
        "baseline_no_conflict": {k: v["accuracy"] for k, v in baseline.items()},
        "pairs_predicted": len(pred_masks),
        "mean_confidence": round(float(all_conf.mean()), 4) if all_conf.size else None,
        "review_queue": len(review),
        "review_pushed": pushed,
        "masks": provenance_counts,
        "config": as_dict(cfg),
    }
    write_json(args.metrics, {k: v for k, v in metrics.items() if k != "config"})
    allrow = table.get("all", {})
    print(
        f"refsel: {version} trained on {len(keys)} annotated pairs; test accuracy {allrow.get('accuracy')} "
        f"(baseline {baseline.get('all', {}).get('accuracy')}), conflict IoU {allrow.get('conflict_iou')}; "
        f"{len(review)} pairs to review; masks {provenance_counts}"
    )


if __name__ == "__main__":
    main()
