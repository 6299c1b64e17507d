"""How many sampler steps should the bundle restore with? Measured on the validation split, never the test sets.

    python benchmarks/probe_sampler_steps.py                 # after `dvc repro evaluate` (about 3 min)
    python benchmarks/probe_sampler_steps.py --steps 8 4 2 1

The evaluation presets degrade the validation targets that have a reference exactly as the reference
gate's calibration does (pipelines.reference_gate.validation_samples: `evaluate.reference_gate.seed` + i).
Each target is restored blind, with 1 and with 3 references (the bundle's gate as evaluated) at every
step count, and scored with the model's own identity encoder (the gate's measure; the evaluator encoder
stays for the test sets). Per preset and step count: blind GT-ID and PSNR, and each reference mode's
paired difference from blind (95 % bootstrap, `evaluate.seed`). The last line names the step count with
the largest severe-set gain with 1 reference, the registry's primary measure (`evaluate.steps` is chosen
by it; docs/results.md, "The sampler's steps"). It writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.evaluation import cosine, embed, psnr_u8  # noqa: E402
from pipelines.reference_gate import validation_samples  # noqa: E402
from pipelines.restorer import Restorer  # noqa: E402
from pipelines.stats import paired_bootstrap  # noqa: E402
from stages._common import load_params  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="data/evaluate/bundle")
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--eval-sets", default="data/eval_sets", help="its index.json names the presets")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--steps", type=int, nargs="+", default=[8, 4, 2, 1])
    args = p.parse_args()
    cfgs = load_params(args.params, "evaluate", "embed")
    cfg, ecfg = cfgs["evaluate"], cfgs["embed"]
    restorer = Restorer(args.bundle, threads=cfg.threads)
    presets = json.loads((Path(args.eval_sets) / "index.json").read_text())["config"]["sets"]
    g = cfg.reference_gate
    severe_gain = {}
    for name, preset in sorted(presets.items()):
        samples = validation_samples(args.shards, preset, g.seed, g.targets)
        lq, gts = [s["lq"] for s in samples], np.stack([s["gt"] for s in samples])
        gt = embed(restorer.encoder, gts, ecfg.crop_border)
        print(f"\n{name} ({preset}): {len(samples)} validation targets with a reference")
        print(
            "| steps | blind GT-ID | blind PSNR | 1 ref − blind GT-ID | PSNR (dB) | 3 refs − blind GT-ID | PSNR (dB) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for steps in args.steps:
            score = {}
            for k in (0, 1, 3):
                out = restorer.restore_in_batches(
                    lq, [s["refs"][:k] for s in samples], cfg.batch_size, steps=steps
                )
                score[k] = (cosine(embed(restorer.encoder, out, ecfg.crop_border), gt), psnr_u8(out, gts))
            cells = [f"{score[0][0].mean():.4f}", f"{score[0][1].mean():.2f}"]
            for k in (1, 3):
                dg = paired_bootstrap(score[k][0], score[0][0], seed=cfg.seed)
                dp = paired_bootstrap(score[k][1], score[0][1], seed=cfg.seed)
                cells += [dg.text(), dp.text(3)]
                if k == 1 and name == "severe":
                    severe_gain[steps] = dg.mean
            print(f"| {steps} | " + " | ".join(cells) + " |", flush=True)
    if severe_gain:
        best = max(severe_gain, key=severe_gain.get)
        print(
            f"\nsampler steps: the largest severe 1-reference gain on validation is at {best} steps "
            f"({severe_gain[best]:+.4f}); evaluate.steps is {cfg.steps}"
        )


if __name__ == "__main__":
    main()
