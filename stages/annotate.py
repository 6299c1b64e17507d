"""Stage `annotate`: conflict-mask annotation of target–reference pairs.

    python -m stages.annotate --shards data/shards --out data/annotate --metrics metrics/annotate.json

The pool is `annotate.pool` pairs of `annotate.split`, chosen in a seeded hash order (growing the pool
appends pairs). Backends:

* `synthetic` (the embedded default, no server): simulated annotators paint each pair from the
  synthetic ground truth with human-like noise (annotation/simulated.py); a share of the pairs gets a
  second annotator so that agreement is measured. Their work goes through the same Label Studio result
  format, store, decoding and review rule as real annotations.
* `label_studio`: the server at $LABEL_STUDIO_URL with the token in $LABEL_STUDIO_API_KEY. The pair
  images are written under `annotate.media_root` (the server's local-files root, file names carrying
  the pixels' digest), tasks are pushed idempotently (stable key and content: a pair rendered again
  gets a new task), predictions of `annotate.prediction_model` are attached as brush
  pre-annotations, then every annotation is pulled.

Outputs (data/annotate is persistent: the store is never deleted by DVC): `annotations.jsonl` (every
version of every annotation, append-only), `decisions.jsonl` (the winning annotation per pair and why),
`masks/<pair>.png` (the winners, contract 0/1/255), `quarantine.jsonl` (annotations that do not decide,
with the reason: malformed, of a vanished pair, or drawn on other pixels than the pair now shows), `pool.jsonl`, and an overview grid `annotations.png`.
"""

from __future__ import annotations

import shutil
import zlib
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from annotation.labeling import mask_to_result
from annotation.simulated import AnnotatorNoise, annotator_rng, simulate
from annotation.store import decide, merge
from pipelines.config import AnnotateConfig
from pipelines.images import png_bytes
from pipelines.io import read_jsonl, write_bytes, write_json, write_jsonl
from pipelines.refsel import Pair, iter_pairs, pair_content, select_pool
from pipelines.viz import mask_overlay, save_grid
from stages._common import load_params, parser, setup_logging


def simulated_records(pool: list[Pair], cfg) -> list[dict]:
    """What the configured annotators would submit, as Label Studio export records."""
    missing = [p.key for p in pool if p.truth is None or p.truth_provenance != "synthetic"]
    if missing:
        raise SystemExit(
            f"error: annotate.backend synthetic needs the synthetic ground-truth masks in the shards; "
            f"pair {missing[0]} has none (a real source): set annotate.backend: label_studio"
        )
    noise = AnnotatorNoise(**asdict(cfg.noise))
    records = []
    for p in pool:
        content = pair_content(p)
        task_id = zlib.crc32(p.key.encode())  # stable: growing the pool never renumbers a pair
        rng = np.random.default_rng([cfg.seed, task_id])
        n = 2 if len(cfg.annotators) > 1 and rng.random() < cfg.double_fraction else 1
        first = int(rng.integers(len(cfg.annotators)))
        for j in range(n):
            who = cfg.annotators[(first + j) % len(cfg.annotators)]
            mask = simulate(p.truth, annotator_rng(cfg.seed, who, p.key), noise)
            records.append(
                {
                    "task_id": task_id,
                    "pair_key": p.key,
                    "content": content,
                    "annotation_id": f"sim-{p.key}-{content}-{j}",
                    "annotator": who,
                    "created_at": "synthetic",
                    "updated_at": "synthetic",
                    "was_cancelled": False,
                    "result": mask_to_result(mask, p.key, salt=who),
                }
            )
    return records


def label_studio_records(pool: list[Pair], cfg) -> tuple[list[dict], dict]:
    """Push the pool (and pre-annotations) to the server and pull every annotation."""
    from annotation.project import (
        STORAGE_DIR,
        PairTask,
        connect,
        ensure_project,
        pull,
        push_predictions,
        push_tasks,
    )

    client = connect()
    media = Path(cfg.media_root)
    folder = media / STORAGE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tasks = []
    for p in pool:
        content = pair_content(p)  # in the file names: images rendered again never overwrite a task's
        gt, ref = (f"{STORAGE_DIR}/{p.key}_{content}_{part}.png" for part in ("gt", "ref"))
        for rel, img in ((gt, p.gt), (ref, p.ref)):
            if not (media / rel).is_file():
                write_bytes(media / rel, png_bytes(img))
        tasks.append(PairTask(p.key, p.target, p.reference, p.ref_index, gt, ref, content))
    project = ensure_project(client, cfg.project, media)
    ids = push_tasks(client, project.id, tasks, media)
    info = {"project_id": project.id, "tasks": len(ids), "predictions_pushed": 0}
    if cfg.prediction_model:
        from pipelines.refsel import (
            confidence,
            degraded_target,
            load_model,
            model_version,
            predict,
            predicted_masks,
            to_tensor,
        )

        model = load_model(cfg.prediction_model)
        version = model_version(cfg.prediction_model)
        lq = to_tensor([degraded_target(p, "realesrgan", cfg.seed) for p in pool])
        probs = predict(model, lq, to_tensor([p.ref for p in pool]))
        conf = confidence(probs).tolist()
        masks = predicted_masks(probs)
        info["predictions_pushed"] = push_predictions(
            client,
            ids,
            {p.key: m for p, m in zip(pool, masks)},
            version,
            {p.key: c for p, c in zip(pool, conf)},
        )
        info["model_version"] = version
    return pull(client, project.id), info


def pull_records(pool: list[Pair], cfg: AnnotateConfig) -> tuple[list[dict], dict]:
    """(annotation records, backend info) from the configured backend: simulated annotators or the
    Label Studio server."""
    if cfg.backend == "synthetic":
        return simulated_records(pool, cfg), {"backend": "synthetic"}
    from label_studio_sdk.core.api_error import ApiError

    from annotation.project import LabelStudioError

    try:
        pulled, info = label_studio_records(pool, cfg)
    except LabelStudioError as exc:
        raise SystemExit(f"error: {exc}") from exc
    except ApiError as exc:
        raise SystemExit(f"error: Label Studio answered HTTP {exc.status_code}: {exc.body}") from exc
    info["backend"] = "label_studio"
    return pulled, info


def write_decisions(out: Path, decisions: dict[str, dict], contents: dict[str, str]) -> None:
    """The winning masks as `masks/<pair>.png` (the folder rewritten) and `decisions.jsonl`."""
    masks_dir = out / "masks"
    shutil.rmtree(masks_dir, ignore_errors=True)
    masks_dir.mkdir()
    rows = []
    for key, d in sorted(decisions.items()):
        write_bytes(masks_dir / f"{key}.png", png_bytes(d["mask"]))
        rows.append({k: v for k, v in d.items() if k != "mask"} | {"pair_key": key, "content": contents[key]})
    write_jsonl(out / "decisions.jsonl", rows)


def annotation_metrics(
    info: dict,
    pool: list[Pair],
    store: list[dict],
    decisions: dict[str, dict],
    quarantine: list[dict],
    pairs: dict[str, Pair],
) -> dict:
    """The stage's metrics: pool, store and decision counts, annotator agreement, and the winners'
    quality against the synthetic ground truth where there is one."""
    from annotation.store import conflict_iou, mask_accuracy

    vs_truth = [
        (conflict_iou(d["mask"], pairs[k].truth), mask_accuracy(d["mask"], pairs[k].truth))
        for k, d in decisions.items()
        if pairs[k].truth is not None and pairs[k].truth_provenance == "synthetic"
    ]
    agreements = [d["agreement_iou"] for d in decisions.values() if d["agreement_iou"] is not None]
    return {
        **info,
        "pool": len(pool),
        "annotations_stored": len(store),
        "pairs_decided": len(decisions),
        "states": dict(sorted(Counter(d["state"] for d in decisions.values()).items())),
        "multi_annotated_pairs": len(agreements),
        "agreement_conflict_iou": round(float(np.mean(agreements)), 4) if agreements else None,
        "quarantined": len(quarantine),
        "vs_truth_conflict_iou": round(float(np.mean([v[0] for v in vs_truth])), 4) if vs_truth else None,
        "vs_truth_accuracy": round(float(np.mean([v[1] for v in vs_truth])), 4) if vs_truth else None,
    }


def write_overview(out: Path, decisions: dict[str, dict], pairs: dict[str, Pair]) -> None:
    """`annotations.png`: target | reference | winning annotation | ground truth for the first 8 pairs
    decided (nothing when none is)."""
    show = sorted(decisions)[:8]
    if show:
        grid = [
            [pairs[k].gt, pairs[k].ref, mask_overlay(pairs[k].ref, decisions[k]["mask"])]
            + ([mask_overlay(pairs[k].ref, pairs[k].truth)] if pairs[k].truth is not None else [None])
            for k in show
        ]
        save_grid(
            out / "annotations.png",
            grid,
            title="target | reference | winning annotation | ground truth (red conflict, dim ignore)",
            col_labels=["target", "reference", "annotation", "truth"],
            row_labels=[decisions[k]["state"] for k in show],
            cell=96,
        )


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    for a in ("--shards", "--out", "--metrics"):
        p.add_argument(a, required=True)
    args = p.parse_args(argv)
    setup_logging()
    cfg = load_params(args.params, "annotate")["annotate"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pairs = {q.key: q for q in iter_pairs(args.shards, cfg.split)}
    if not pairs:
        raise SystemExit(f"error: {args.shards} has no {cfg.split} pairs with references to annotate")
    pool = [pairs[k] for k in select_pool(list(pairs), cfg.pool, cfg.seed)]
    write_jsonl(
        out / "pool.jsonl", [{"pair_key": q.key, "target": q.target, "reference": q.reference} for q in pool]
    )
    pulled, info = pull_records(pool, cfg)

    store_file = out / "annotations.jsonl"
    store = read_jsonl(store_file) if store_file.is_file() else []
    store, new = merge(store, pulled)
    write_jsonl(store_file, store)  # everything pulled is kept before anything is decided

    sizes = {k: q.ref.shape[:2] for k, q in pairs.items()}
    contents = {k: pair_content(q) for k, q in pairs.items()}
    decisions, quarantine = decide(store, sizes, contents)
    for q in quarantine:
        print(f"annotate: quarantined annotation {q['annotation_id']} of {q['pair_key']}: {q['reason']}")
    write_jsonl(out / "quarantine.jsonl", quarantine)
    write_decisions(out, decisions, contents)
    metrics = annotation_metrics(info, pool, store, decisions, quarantine, pairs)
    # `new` depends on what earlier runs already pulled into the append-only store: it is printed and
    # not a DVC metric (a fresh clone would count every annotation as new).
    write_json(args.metrics, metrics)
    write_overview(out, decisions, pairs)
    print(
        f"annotate: {metrics['pairs_decided']}/{len(pool)} pairs decided ({metrics['states']}), "
        f"{new} new of {len(store)} stored annotations, agreement IoU {metrics['agreement_conflict_iou']}, "
        f"{len(quarantine)} quarantined"
    )


if __name__ == "__main__":
    main()
