"""The annotation store (append-only), decoding, agreement between annotators and the review rule.

Nothing pulled is ever lost or overwritten: a record is identified by (annotation_id, updated_at), so an
annotation edited in Label Studio is stored again as a new version next to the old one. Decisions use
the newest version of each annotation.

Review rule, per pair: annotations that were cancelled (skipped) or carry `review: reject` are out; a
malformed one is quarantined with its reason. Among the rest, the newest with `review: accept` wins
(state `reviewed`); otherwise, with two or more, the one with the highest mean conflict-IoU to the others
(state `consensus`); otherwise the only one (state `single`). With the pairs' contents given, an
annotation counts only for the pixels it was drawn on (its recorded `content`): one drawn on other
images, or recording none, is quarantined with the reason and stays in the store.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations

import numpy as np

from annotation.labeling import AnnotationError, result_to_mask, review_choice
from models.refsel import MASK_CONFLICT, MASK_IGNORE


def version_id(rec: dict) -> str:
    return f"{rec['pair_key']}#{rec['annotation_id']}@{rec.get('updated_at') or rec.get('created_at') or ''}"


def merge(store: list[dict], pulled: list[dict]) -> tuple[list[dict], int]:
    """store + the pulled versions not yet in it (sorted, stable); returns (records, how many new)."""
    seen = {version_id(r) for r in store}
    new = [r for r in pulled if version_id(r) not in seen]
    out = sorted(store + new, key=lambda r: (r["pair_key"] or "", str(r["annotation_id"]), version_id(r)))
    return out, len(new)


def conflict_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of the conflict regions (1.0 when neither has any conflict)."""
    ca, cb = a == MASK_CONFLICT, b == MASK_CONFLICT
    union = (ca | cb).sum()
    return 1.0 if union == 0 else float((ca & cb).sum() / union)


def mask_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Pixel accuracy of consistent/conflict on the truth's non-ignore pixels (pred ignore counts as wrong)."""
    valid = truth != MASK_IGNORE
    return 1.0 if not valid.any() else float((pred[valid] == truth[valid]).mean())


def decide(
    records: list[dict], sizes: dict[str, tuple[int, int]], contents: dict[str, str] | None = None
) -> tuple[dict, list[dict]]:
    """Per pair_key: {"mask", "annotation_id", "annotator", "state", "n", "agreement_iou", "versions"};
    plus the quarantined annotations [{pair_key, annotation_id, annotator, reason}].

    `contents` ({pair_key: pipelines.refsel.pair_content}) binds annotations to pixels: an annotation
    whose recorded `content` differs (the shards were rendered again, so the key now names other images)
    or that records none is quarantined with the reason and does not decide; it stays in the store."""
    newest: dict[tuple, dict] = {}
    versions: dict[str, int] = defaultdict(int)
    for r in records:
        versions[r["pair_key"]] += 1
        k = (r["pair_key"], r["annotation_id"])
        if k not in newest or version_id(r) > version_id(newest[k]):
            newest[k] = r
    by_pair: dict[str, list[dict]] = defaultdict(list)
    for (key, _), r in sorted(newest.items(), key=lambda kv: (kv[0][0] or "", str(kv[0][1]))):
        by_pair[key].append(r)
    decisions, quarantine = {}, []
    for key, recs in sorted(by_pair.items(), key=lambda kv: kv[0] or ""):
        if key not in sizes:
            quarantine += [
                {
                    "pair_key": key,
                    "annotation_id": r["annotation_id"],
                    "annotator": r["annotator"],
                    "reason": f"task {r['task_id']} ({key}) is not a pair of the current shards (image gone)",
                }
                for r in recs
            ]
            continue
        h, w = sizes[key]
        cands = []
        for r in recs:
            now = None if contents is None else contents.get(key)
            if contents is not None and r.get("content") != now:
                why = (
                    f"annotation {r['annotation_id']} of {key} was drawn on other images (content "
                    f"{r['content']}, the pair's now {now}): the shards were rendered again since; the pair "
                    "needs a new annotation"
                    if r.get("content")
                    else f"annotation {r['annotation_id']} of {key} records no content (made before "
                    f"annotations were bound to their pixels): which images it was drawn on is not known; "
                    f"the pair (content {now}) needs a new annotation"
                )
                quarantine.append(
                    {
                        "pair_key": key,
                        "annotation_id": r["annotation_id"],
                        "annotator": r["annotator"],
                        "reason": why,
                    }
                )
                continue
            choice = review_choice(r["result"])
            if r.get("was_cancelled") or choice == "reject":
                continue
            try:
                m = result_to_mask(r["result"], h, w, key)
            except AnnotationError as exc:
                quarantine.append(
                    {
                        "pair_key": key,
                        "annotation_id": r["annotation_id"],
                        "annotator": r["annotator"],
                        "reason": str(exc),
                    }
                )
                continue
            cands.append((r, m, choice))
        if not cands:
            continue
        ious = {}
        for (i, (_, a, _)), (j, (_, b, _)) in combinations(enumerate(cands), 2):
            ious[i, j] = ious[j, i] = conflict_iou(a, b)
        accepted = [i for i, c in enumerate(cands) if c[2] == "accept"]
        if accepted:
            win = max(accepted, key=lambda i: version_id(cands[i][0]))
            state = "reviewed"
        elif len(cands) > 1:
            mean = [np.mean([ious[i, j] for j in range(len(cands)) if j != i]) for i in range(len(cands))]
            win = int(np.argmax(mean))
            state = "consensus"
        else:
            win, state = 0, "single"
        r, m, _ = cands[win]
        decisions[key] = {
            "mask": m,
            "annotation_id": r["annotation_id"],
            "annotator": r["annotator"],
            "task_id": r["task_id"],
            "updated_at": r.get("updated_at"),
            "state": state,
            "n": len(cands),
            "agreement_iou": float(np.mean(list(ious.values()))) if ious else None,
            "versions": versions[key],
        }
    return decisions, quarantine


def ignore_fraction(mask: np.ndarray) -> float:
    return float((mask == MASK_IGNORE).mean())
