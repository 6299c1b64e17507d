"""Why the blind mode trails the front end alone: paired on the evaluation sets' targets.

    python benchmarks/probe_blind_vs_front.py            # after `dvc repro evaluate` (about 3 min)

`reports/evaluation.md` shows the front end's output alone above the blind mode in PSNR (the transformer
samples from the front end's output, one draw per target). A sampler draws from the model's posterior;
the mean of several draws estimates the posterior mean, which is what PSNR rewards (the
perception–distortion trade-off). This probe restores every target of each evaluation set blind with
`--draws` sampler seeds and with fewer sampler steps, and pairs each row with the front end alone (95 %
paired bootstrap, evaluate.seed): if the mean of the draws closes the gap, the blind mode's PSNR cost is
the sampling noise's; if fewer steps close it, it is the sampler's trajectory. Fewer steps as a lever: the
references' effect (1 and 3 references − blind, gated as evaluation is) at each step count. It writes
nothing; the figures are in docs/results.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.embedding import load_encoders  # noqa: E402
from pipelines.restorer import Restorer  # noqa: E402
from pipelines.set_evaluation import load_set, per_target  # noqa: E402
from pipelines.stats import paired_bootstrap  # noqa: E402
from stages._common import load_params  # noqa: E402


def restore(restorer: Restorer, samples: list, k: int, batch: int, seed: int, steps: int) -> np.ndarray:
    """Every target restored with its first `k` references (0: blind; the bundle's reference gate
    applies) with sampler `seed` and `steps` (uint8)."""
    lq = [s["lq"] for s in samples]
    return np.concatenate(
        [
            restorer.restore_batch(
                lq[i : i + batch], [s["refs"][:k] for s in samples[i : i + batch]], seed=seed, steps=steps
            )
            for i in range(0, len(lq), batch)
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="data/evaluate/bundle")
    p.add_argument("--eval-sets", default="data/eval_sets")
    p.add_argument("--encoders", default="data/encoders")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--draws", type=int, default=4, help="sampler seeds per target (evaluate.seed onwards)")
    p.add_argument("--steps", type=int, nargs="*", default=[1, 2], help="fewer sampler steps to try")
    args = p.parse_args()
    cfgs = load_params(args.params, "evaluate", "embed")
    cfg, ecfg = cfgs["evaluate"], cfgs["embed"]
    restorer = Restorer(args.bundle, threads=cfg.threads)
    evaluator = load_encoders(ecfg, args.encoders).evaluator
    kmax = max(max(cfg.modes), 1)
    for name in ("moderate", "severe"):
        samples, _ = load_set(args.eval_sets, name, cfg.samples, kmax)  # the report's targets

        def score(outs, samples=samples):
            v = per_target(outs, samples, restorer.encoder, evaluator, cfg.copy_tau, ecfg.crop_border)
            return v["psnr"], v["gt_id"]

        front = score(restorer.front_only([s["lq"] for s in samples]))
        draws = [
            restore(restorer, samples, 0, cfg.batch_size, cfg.seed + i, cfg.steps) for i in range(args.draws)
        ]
        rows = {f"blind, one draw (seed {cfg.seed}, {cfg.steps} steps: the report's)": score(draws[0])}
        mean = np.mean([d.astype(np.float64) for d in draws], 0).round().clip(0, 255).astype(np.uint8)
        rows[f"blind, mean of {args.draws} draws"] = score(mean)
        refs = {}  # the references' effect at each step count: what fewer steps would cost
        for steps in (cfg.steps, *args.steps):
            b = rows[next(iter(rows))] if steps == cfg.steps else None
            if b is None:
                b = rows[f"blind, {steps} sampler step{'s' if steps > 1 else ''}"] = score(
                    restore(restorer, samples, 0, cfg.batch_size, cfg.seed, steps)
                )
            for k in (1, kmax):
                refs[
                    f"{k} reference{'s' if k > 1 else ''} − blind, {steps} step{'s' if steps > 1 else ''}"
                ] = (
                    score(restore(restorer, samples, k, cfg.batch_size, cfg.seed, steps)),
                    b,
                )
        spread = np.mean([np.abs(d.astype(np.float64) - mean).mean() for d in draws])
        print(
            f"\n{name}: {len(samples)} targets; front end alone PSNR {front[0].mean():.2f} dB, GT-ID "
            f"{front[1].mean():.4f}; mean |draw - mean of draws| {spread:.2f} / 255"
        )
        print("| row | PSNR (dB) | Δ PSNR vs front end | Δ GT-ID vs front end |")
        print("|---|---:|---:|---:|")
        for row, (ps, gi) in rows.items():
            dp = paired_bootstrap(ps, front[0], seed=cfg.seed)
            dg = paired_bootstrap(gi, front[1], seed=cfg.seed)
            print(f"| {row} | {ps.mean():.2f} | {dp.text(3)} {dp.verdict} | {dg.text()} {dg.verdict} |")
        print("| references | Δ GT-ID vs blind (same steps) | Δ PSNR vs blind |")
        print("|---|---:|---:|")
        for row, ((ps, gi), (bp, bg)) in refs.items():
            dg, dp = paired_bootstrap(gi, bg, seed=cfg.seed), paired_bootstrap(ps, bp, seed=cfg.seed)
            print(f"| {row} | {dg.text()} {dg.verdict} | {dp.text(3)} {dp.verdict} |")


if __name__ == "__main__":
    main()
