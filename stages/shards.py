"""Stage `shards`: webdataset shards per split, an index, and a preview picture.

    python -m stages.shards --ingest data/ingest --embeddings data/embeddings --pairs data/pairs \
        --out data/shards --metrics metrics/shards.json

For the synthetic source the exact ground-truth conflict masks are written as `refmask{i}.png` with
provenance `synthetic`. `data/shards/preview.png` shows samples' target, references and masks side by
side.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipelines.config import ShardsConfig, as_dict
from pipelines.images import load_rgb, png_bytes, resize
from pipelines.io import read_json, read_jsonl, write_json
from pipelines.shards import (
    FORMAT_VERSION,
    INDEX_NAME,
    decode_sample,
    iter_raw,
    npy_bytes,
    validate_shards,
    write_split,
)
from pipelines.synthetic import FaceSpec, conflict_kinds, conflict_mask
from pipelines.viz import mask_overlay, save_grid
from stages._common import load_params, parser, progress_enabled, setup_logging

SPLITS = ("train", "val", "test")


class _Images:
    """Loads and resizes manifest images once each (references are shared between targets)."""

    def __init__(self, manifest: dict[str, dict], cfg: ShardsConfig):
        self.manifest, self.cfg, self.cache = manifest, cfg, {}

    def png(self, image_id: str) -> bytes:
        if image_id not in self.cache:
            img = load_rgb(self.manifest[image_id]["path"])[0]
            self.cache[image_id] = png_bytes(resize(img, self.cfg.resolution, self.cfg.resize_method))
        return self.cache[image_id]


def _specs(source: dict, manifest: dict[str, dict]) -> dict[str, FaceSpec] | None:
    if source["source"]["kind"] != "synthetic":
        return None
    states = {
        r["relpath"]: FaceSpec.from_json(r["spec"])
        for r in read_jsonl(Path(source["source"]["root"]) / "states.jsonl")
    }
    missing = [iid for iid, r in manifest.items() if r["relpath"] not in states]
    if missing:
        raise SystemExit(
            f"error: states.jsonl of the synthetic source lacks {missing[:3]}...; re-run `dvc repro synthesize`"
        )
    return {iid: states[r["relpath"]] for iid, r in manifest.items()}


def build_sample(
    pr: dict,
    split: str,
    cfg: ShardsConfig,
    images: _Images,
    manifest: dict[str, dict],
    specs: dict[str, FaceSpec] | None,
    emb: np.ndarray,
    row_of: dict[str, int],
    encoder: str,
    conflict_counts: dict[str, int],
) -> dict:
    """One shard sample of a pair: target, references (with synthetic conflict masks when `specs`
    is given), meta and embeddings; counts the pair's conflict kinds into `conflict_counts`."""
    refs = pr["refs"][: cfg.max_refs]
    t = pr["target"]
    s = {"__key__": t, "gt.png": images.png(t)}
    provenance, kinds = [], []
    for i, r in enumerate(refs):
        s[f"ref{i}.png"] = images.png(r)
        if specs is not None:
            s[f"refmask{i}.png"] = png_bytes(conflict_mask(specs[t], specs[r], cfg.resolution))
            provenance.append("synthetic")
            k = conflict_kinds(specs[t], specs[r])
            kinds.append(k)
            for kind in k:
                conflict_counts[kind] = conflict_counts.get(kind, 0) + 1
    meta = {
        "key": t,
        "target": t,
        "refs": refs,
        "identity": pr["identity"],
        "split": split,
        "ref_count": len(refs),
        "ref_cosines": pr["ref_cosines"][: cfg.max_refs],
        "sources": {"gt": manifest[t]["path"], "refs": [manifest[r]["path"] for r in refs]},
        "resolution": cfg.resolution,
        "resize_method": cfg.resize_method,
        "mask_provenance": provenance,
        "conflict_types": kinds,
        "embedding_encoder": encoder,
    }
    s["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    s["gt_emb.npy"] = npy_bytes(emb[row_of[t]])
    s["ref_emb.npy"] = npy_bytes(emb[[row_of[r] for r in refs]])
    return s


def write_preview(out: Path, index: dict, preview_samples: int) -> None:
    """`preview.png`: target | references | references with their conflict masks, for the first samples
    of the first test shard (else the first train shard)."""
    rows, labels = [], []
    raws = list(
        iter_raw(
            [
                str(out / e["name"])
                for e in index["splits"]["test"]["shards"][:1] or index["splits"]["train"]["shards"][:1]
            ]
        )
    )
    for raw in raws[:preview_samples]:
        smp = decode_sample(raw)
        k = min(len(smp["refs"]), 4)
        row = [smp["gt"], *smp["refs"][:k], *[None] * (4 - k)]
        row += [
            mask_overlay(r, m) if m is not None else None for r, m in zip(smp["refs"][:k], smp["masks"][:k])
        ]
        rows.append(row)
        labels.append(smp["key"][:12])
    if rows:
        save_grid(
            out / "preview.png",
            rows,
            title="target | references (ordered) | references with conflict masks (red conflict, dim ignore)",
            row_labels=labels,
            col_labels=["target", "ref0", "ref1", "ref2", "ref3", "mask0", "mask1", "mask2", "mask3"],
            cell=96,
        )


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    for a in ("--ingest", "--embeddings", "--pairs", "--out", "--metrics"):
        p.add_argument(a, required=True)
    args = p.parse_args(argv)
    setup_logging()
    cfg: ShardsConfig = load_params(args.params, "shards")["shards"]
    ing = Path(args.ingest)
    manifest = {r["image_id"]: r for r in read_jsonl(ing / "manifest.jsonl")}
    source = read_json(ing / "source.json")
    emb = np.load(Path(args.embeddings) / "embeddings.npy")
    emb_meta = read_json(Path(args.embeddings) / "embeddings.json")
    row_of = {iid: i for i, iid in enumerate(emb_meta["image_ids"])}
    pairs = read_jsonl(Path(args.pairs) / "pairs.jsonl")
    specs = _specs(source, manifest)
    images = _Images(manifest, cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.tar"):
        old.unlink()

    conflict_counts: dict[str, int] = {}
    bar = tqdm(total=len(pairs), desc="shards", unit="sample", disable=not progress_enabled())

    def samples(split: str):
        for pr in (p for p in pairs if p["split"] == split):
            s = build_sample(
                pr, split, cfg, images, manifest, specs, emb, row_of, emb_meta["encoder"], conflict_counts
            )
            bar.update(1)
            yield s

    index = {
        "format_version": FORMAT_VERSION,
        "config": as_dict(cfg),
        "encoder": emb_meta["encoder"],
        "splits": {},
    }
    for split in SPLITS:
        entries = write_split(out, split, samples(split), cfg.samples_per_shard)
        index["splits"][split] = {"samples": sum(e["samples"] for e in entries), "shards": entries}
    bar.close()
    write_json(out / INDEX_NAME, index)
    validate_shards(out)
    write_preview(out, index, cfg.preview_samples)
    metrics = {
        "samples": {s: index["splits"][s]["samples"] for s in SPLITS},
        "shards": {s: len(index["splits"][s]["shards"]) for s in SPLITS},
        "bytes": sum(e["bytes"] for s in SPLITS for e in index["splits"][s]["shards"]),
        "masks": "synthetic" if specs is not None else "none",
        "conflict_pairs": dict(sorted(conflict_counts.items())),
    }
    write_json(args.metrics, metrics)
    print(
        f"shards: {metrics['samples']} samples in {sum(metrics['shards'].values())} shards ({metrics['bytes'] / 1e6:.1f} MB), masks {metrics['masks']}"
    )


if __name__ == "__main__":
    main()
