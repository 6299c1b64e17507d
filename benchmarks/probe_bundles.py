"""Paired probe of restorer bundles on the frozen evaluation sets: the reference gain of one bundle under
sampler settings, and, with `--against`, the paired difference to a second bundle (no retraining).

    python benchmarks/probe_bundles.py [--bundle data/evaluate/bundle] [--against OLD_BUNDLE] \
        [--steps 8] [--guidance-context 1.5] [--sets severe moderate]

Targets: those with 3 references in each set (as `evaluate` pairs them). Per set it prints GT-ID
(evaluator) of the blind mode, 1 and 3 references and, on severe, 3 references of another person; then
the paired differences with 95 % bootstrap intervals (seed 42): 1 ref − blind (the learning issue's
reference gain), 3 − 1, true − other person, Δ copy (1 ref − blind), Δ PSNR (1 ref − blind). With
`--against`: this bundle's reference gain minus the other's, and its 1-reference and blind GT-ID minus
the other's, on the same targets. `--guidance-context` is seed 002's s_c (eq. 5, s_i = 1). Reads data/
(`dvc repro` first); writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.embedding import load_identity_encoder  # noqa: E402
from pipelines.evaluation import copy_score, cosine, embed, psnr_u8  # noqa: E402
from pipelines.restorer import Restorer  # noqa: E402
from pipelines.stats import paired_bootstrap  # noqa: E402
from stages.evaluate import load_set, other_person  # noqa: E402


def interval(a: np.ndarray, b: np.ndarray) -> str:
    """a − b paired over targets with its 95 % bootstrap interval (seed 42, as `evaluate` reports)."""
    return paired_bootstrap(a, b, seed=42).text()


def modes(restorer: Restorer, samples: list[dict], pool: list[dict], kw: dict, control: bool) -> dict:
    """Restorations per mode (uint8 arrays), in batches of 16 as `evaluate` runs them."""
    lq = [s["lq"] for s in samples]

    def run(refs):
        return np.concatenate(
            [restorer.restore_batch(lq[i : i + 16], refs[i : i + 16], **kw) for i in range(0, len(lq), 16)]
        )

    out = {
        "blind": run([[] for _ in samples]),
        "1": run([s["refs"][:1] for s in samples]),
        "3": run([s["refs"][:3] for s in samples]),
    }
    if control:
        out["other"] = run(other_person(samples, pool, 3))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", default="data/evaluate/bundle")
    p.add_argument("--against", default=None, help="a second bundle, compared paired on the same targets")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--guidance-context", type=float, default=None)
    p.add_argument("--sets", nargs="+", default=["severe", "moderate"])
    p.add_argument("--eval-sets", default="data/eval_sets")
    p.add_argument("--evaluator", default="data/encoders/evaluator.safetensors")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    t0 = time.perf_counter()
    evaluator = load_identity_encoder("small_ir", a.evaluator)[0]
    kw = {"steps": a.steps, "guidance_context": a.guidance_context}
    bundles = [Restorer(a.bundle, threads=a.threads)]
    if a.against:
        bundles.append(Restorer(a.against, threads=a.threads))
    for name in a.sets:
        samples, _ = load_set(a.eval_sets, name, 0, 3)
        pool, _ = load_set(a.eval_sets, name, 0, 0)
        gt = np.stack([s["gt"] for s in samples])
        e_gt = embed(evaluator, gt)
        ids, outs = [], []
        for r in bundles:
            o = modes(r, samples, pool, kw, control=name == "severe")
            outs.append(o)
            ids.append({k: cosine(embed(evaluator, v), e_gt) for k, v in o.items()})
        i, o = ids[0], outs[0]
        copy = {
            k: np.array(
                [
                    copy_score(o[k][j], s["gt"], s["refs"][0], s["masks"][0], 12.0)
                    if s["masks"][0] is not None
                    else np.nan
                    for j, s in enumerate(samples)
                ]
            )
            for k in ("blind", "1")
        }
        means = " | ".join(f"{k} {v.mean():.4f}" for k, v in i.items())
        print(f"== {name} (n={len(samples)}, steps {a.steps}, s_c {a.guidance_context}) GT-ID: {means}")
        print(f"   1 ref − blind {interval(i['1'], i['blind'])}")
        print(f"   3 − 1 ref     {interval(i['3'], i['1'])}")
        if "other" in i:
            print(f"   3 true − 3 other person {interval(i['3'], i['other'])}")
        print(f"   Δ copy (1 ref − blind) {interval(copy['1'], copy['blind'])}")
        print(f"   Δ PSNR (1 ref − blind) {interval(psnr_u8(o['1'], gt), psnr_u8(o['blind'], gt))}")
        if a.against:
            j = ids[1]
            print(f"   vs --against: gain {interval(i['1'] - i['blind'], j['1'] - j['blind'])}")
            print(
                f"   vs --against: 1 ref {interval(i['1'], j['1'])}, blind {interval(i['blind'], j['blind'])}"
            )
    print(
        f"probe_bundles: {len(a.sets)} set(s), {len(bundles)} bundle(s) in {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
