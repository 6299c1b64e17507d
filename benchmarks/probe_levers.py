"""Lever probe for the learning issue: the `train` config with overrides, through the one training entry
point (`pipelines.fit.fit`), scored on the frozen evaluation sets exactly as `evaluate` samples them
(the first targets with 3 references, batches of `evaluate.batch_size`, seed `evaluate.seed`).

    python benchmarks/probe_levers.py --steps 400 --set train.source=degraded --set degrade.preset=refldm_train \
        [--sampler-steps 8 4 1] [--json out.json]

Prints, per evaluation set and sampler setting: PSNR / SSIM of blind and 1 / 3 references against the
degraded input, GT-ID (evaluator) of each mode, the paired reference gain (1 reference − blind) with
its 95 % bootstrap interval, and the control (3 true references − 3 of another person). Reads data/
(`dvc repro` first); nothing it trains is saved (a measurement, not a stage).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def parse_value(text: str):
    return yaml.safe_load(text)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--set", action="append", default=[], help="section.key=value (YAML value)")
    p.add_argument("--sampler-steps", type=int, nargs="+", default=None)
    p.add_argument("--sets", nargs="+", default=["severe", "moderate"])
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import pipelines.fit as fitmod
    from pipelines.config import load_sections
    from pipelines.embedding import load_encoders
    from pipelines.evaluation import cosine, embed, psnr_u8, ssim_u8
    from pipelines.stats import paired_bootstrap
    from pipelines.training import make_batch, to_uint8, validation_batch
    from stages.evaluate import load_set

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for item in args.set:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        raw[section][name] = parse_value(value)
    cfgs = load_sections(raw)
    cfg, dcfg, ecfg, ev = cfgs["train"], cfgs["degrade"], cfgs["embed"], cfgs["evaluate"]
    encoders = load_encoders(ecfg, "data/encoders")
    val = validation_batch("data/shards", replace(cfg, val_samples=8), cfg.max_refs)
    t0 = time.perf_counter()
    r = fitmod.fit(cfg, dcfg, "data/shards", encoders, val, steps=args.steps, val_steps=2)
    train_s = time.perf_counter() - t0
    print(
        f"probe {' '.join(args.set)}: {args.steps} steps in {train_s:.0f} s ({r.timing['samples_per_s']} samples/s)"
    )
    module = r.module.eval()
    results: dict = {"set": args.set, "steps": args.steps, "train_s": round(train_s, 1), "rows": {}}
    for name in args.sets:
        samples, _ = load_set("data/eval_sets", name, ev.samples, 3)
        gt = np.stack([s["gt"] for s in samples])
        lq = np.stack([s["lq"] for s in samples])
        g = embed(encoders.evaluator, gt, ecfg.crop_border)
        lq_ps, lq_ss = psnr_u8(lq, gt), ssim_u8(lq, gt)
        lq_id = cosine(embed(encoders.evaluator, lq, ecfg.crop_border), g)
        print(
            f"{name}: n={len(samples)} degraded PSNR {lq_ps.mean():.2f} SSIM {lq_ss.mean():.4f} GT-ID {lq_id.mean():.4f}"
        )
        if getattr(module.net, "front", None) is not None:
            import torch

            with torch.no_grad():
                fe = to_uint8(module.clean(make_batch(list(lq), [[] for _ in lq])["lq"]))
            d = paired_bootstrap(psnr_u8(fe, gt), lq_ps)
            print(f"  {name} front end alone: PSNR {psnr_u8(fe, gt).mean():.2f} (vs degraded {d.text(3)})")
        other = [samples[(i + len(samples) // 2) % len(samples)] for i in range(len(samples))]
        for steps in args.sampler_steps or [ev.steps]:
            ids, pss = {}, {}
            for k in (0, 1, 3, -3):
                outs = []
                for i in range(0, len(samples), ev.batch_size):
                    chunk = samples[i : i + ev.batch_size]
                    src = other[i : i + ev.batch_size] if k < 0 else chunk
                    b = make_batch([s["lq"] for s in chunk], [s["refs"][: abs(k)] for s in src])
                    if k:
                        b["z_refs"] = module.identity(b["refs"].flatten(0, 1)).unflatten(
                            0, b["refs"].shape[:2]
                        )
                    outs.append(to_uint8(module.restore(b, steps=steps, guidance=ev.guidance, seed=ev.seed)))
                out = np.concatenate(outs)
                ps, ss = psnr_u8(out, gt), ssim_u8(out, gt)
                gid = cosine(embed(encoders.evaluator, out, ecfg.crop_border), g)
                ids[k], pss[k] = gid, ps
                d = paired_bootstrap(ps, lq_ps)
                print(
                    f"  {name} steps={steps} refs={k:+d}: PSNR {ps.mean():.2f} (vs degraded {d.text(3)}) "
                    f"SSIM {ss.mean():.4f} ({ss.mean() - lq_ss.mean():+.4f}) GT-ID {gid.mean():.4f}"
                )
                results["rows"][f"{name}/{steps}/{k}"] = {
                    "psnr": float(ps.mean()),
                    "ssim": float(ss.mean()),
                    "gt_id": float(gid.mean()),
                    "psnr_gain": float(d.mean),
                    "psnr_ci": [float(d.lo), float(d.hi)],
                }
            for a, b_, label in ((1, 0, "1 ref - blind"), (3, 1, "3 refs - 1 ref"), (3, -3, "true - other")):
                d = paired_bootstrap(ids[a], ids[b_])
                print(f"  {name} steps={steps} GT-ID {label}: {d.text()} ({d.verdict})")
                results["rows"][f"{name}/{steps}/{label}"] = {
                    "mean": float(d.mean),
                    "ci": [float(d.lo), float(d.hi)],
                }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
