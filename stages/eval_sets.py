"""Stage `eval_sets`: frozen degraded evaluation sets from the test split.

    python -m stages.eval_sets --shards data/shards --masks data/refsel/shards --out data/eval_sets \
        --metrics metrics/eval_sets.json

Conflict masks (for the copy score): the source's exact ones where it has them (the synthetic default);
for a reference without one (FFHQ-Ref, a team's own album), the refsel stage's mask from `--masks`
(annotated where people painted, else predicted), with its provenance in `meta.json`
(`mask_provenance`), so that the copy score is measured on every source.

For every set (name -> preset in params `eval_sets.sets`, by default ReF-LDM's moderate and severe),
sample i of the split (shard order) is degraded with `numpy.random.default_rng(seed + i)`. The
samples keep their references, masks and embeddings untouched and gain `lq.png` and the drawn
parameters in `meta.json`. Re-running gives byte-identical shards. `grid.png` shows GT | each set's LQ.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipelines.config import as_dict
from pipelines.degradations import get_preset
from pipelines.evaluation import psnr_u8
from pipelines.images import png_bytes
from pipelines.io import write_json
from pipelines.shards import (
    FORMAT_VERSION,
    INDEX_NAME,
    decode_sample,
    iter_raw,
    shard_paths,
    validate_shards,
    write_split,
)
from pipelines.viz import save_grid
from stages._common import load_params, parser, progress_enabled, setup_logging


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(psnr_u8(a[None], b[None])[0])


def with_masks(raws: list[dict], masks: dict[str, dict]) -> tuple[list[dict], int]:
    """Fill each reference's missing conflict mask from the refsel shard sample of the same key."""
    out, filled = [], 0
    for raw in raws:
        other = masks.get(raw["__key__"])
        meta = json.loads(raw["meta.json"])
        missing = [i for i in range(meta["ref_count"]) if f"refmask{i}.png" not in raw]
        if other is None or not missing:
            out.append(raw)
            continue
        raw = dict(raw)
        prov = list(meta.get("mask_provenance") or [None] * meta["ref_count"])
        other_prov = json.loads(other["meta.json"]).get("mask_provenance", [])
        for i in missing:
            if f"refmask{i}.png" in other:
                raw[f"refmask{i}.png"] = other[f"refmask{i}.png"]
                prov[i] = other_prov[i] if i < len(other_prov) else "predicted"
                filled += 1
        meta["mask_provenance"] = prov
        raw["meta.json"] = json.dumps(meta, sort_keys=True).encode()
        out.append(raw)
    return out, filled


def _degraded(
    raws: list[dict], name: str, preset_name: str, seed: int, values: list, grid: list, n_grid: int
):
    """Samples of one evaluation set: sample i degraded with default_rng(seed + i)."""
    preset = get_preset(preset_name)
    for i, raw in enumerate(tqdm(raws, desc=f"eval_sets {name}", disable=not progress_enabled())):
        gt = decode_sample(raw)["gt"]
        lq, params = preset(gt, np.random.default_rng(seed + i))
        values.append(psnr(lq, gt))
        if i < n_grid:
            grid.append(lq)
        meta = json.loads(raw["meta.json"])
        meta.update(
            {"eval_set": name, "preset": preset_name, "index": i, "seed": seed + i, "degradation": params}
        )
        s = {k: v for k, v in raw.items() if k != "meta.json"}
        s["lq.png"] = png_bytes(lq)
        s["meta.json"] = json.dumps(meta, sort_keys=True).encode()
        yield s


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    for a in ("--shards", "--out", "--metrics"):
        p.add_argument(a, required=True)
    p.add_argument("--masks", help="refsel shards whose masks fill references without exact ones")
    args = p.parse_args(argv)
    setup_logging()
    cfg = load_params(args.params, "eval_sets")["eval_sets"]
    validate_shards(args.shards)
    raws = list(iter_raw(shard_paths(args.shards, cfg.split)))
    if not raws:
        raise SystemExit(f"error: split {cfg.split!r} of {args.shards} is empty; nothing to evaluate on")
    filled = 0
    if args.masks:
        validate_shards(args.masks)
        raws, filled = with_masks(
            raws, {r["__key__"]: r for r in iter_raw(shard_paths(args.masks, cfg.split))}
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.tar"):
        old.unlink()
    index = {"format_version": FORMAT_VERSION, "config": as_dict(cfg), "splits": {}}
    metrics: dict = {"samples": len(raws), "masks_from_refsel": filled, "sets": {}}
    grid_cols: dict[str, list] = {}
    for name, preset_name in cfg.sets.items():
        values: list[float] = []
        grid_cols[name] = []
        samples = _degraded(raws, name, preset_name, cfg.seed, values, grid_cols[name], cfg.grid_samples)
        entries = write_split(out, name, samples, cfg.samples_per_shard)
        index["splits"][name] = {
            "samples": sum(e["samples"] for e in entries),
            "shards": entries,
            "preset": preset_name,
        }
        metrics["sets"][name] = {"preset": preset_name, "lq_psnr_mean": round(float(np.mean(values)), 4)}
    write_json(out / INDEX_NAME, index)
    validate_shards(out)
    gts = [decode_sample(r)["gt"] for r in raws[: cfg.grid_samples]]
    rows = [[g, *(grid_cols[n][j] for n in cfg.sets)] for j, g in enumerate(gts)]
    save_grid(
        out / "grid.png",
        rows,
        title="evaluation sets: GT | " + " | ".join(cfg.sets),
        col_labels=["GT", *cfg.sets],
        cell=96,
    )
    write_json(args.metrics, metrics)
    print(
        f"eval_sets: {len(raws)} {cfg.split} targets x {len(cfg.sets)} sets; LQ PSNR "
        + ", ".join(f"{n} {m['lq_psnr_mean']:.2f} dB" for n, m in metrics["sets"].items())
    )


if __name__ == "__main__":
    main()
