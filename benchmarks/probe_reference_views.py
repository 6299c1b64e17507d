"""Does a reference's mirror image count as a second view? Paired on the evaluation sets' targets.

    python benchmarks/probe_reference_views.py            # after `dvc repro evaluate` (about 4 min)

With one reference the readout (models.iconface.ReferenceReadout) reads that photo's pose, expression and
lighting at every grid position; with three it averages three states of the same face, so what the
references share (who they show) adds up and what they do not (their state) averages out: on the severe
set 3 references − blind is more than twice 1 reference − blind. An aligned face mirrored about its
vertical axis is the same person in another state (yaw, lighting and expression mirrored). This probe
restores every target of each evaluation set blind, with its first k references, and with them followed
by their mirror images (as many as fit in the model's max_refs), and pairs each row with the blind mode
and the mirrored row with the same k unmirrored (95 % paired bootstrap, evaluate.seed). The bundle's
reference gate applies as in evaluation. It writes nothing; the figures are in docs/results.md.
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


def views(refs: list[np.ndarray], k: int, limit: int, mirror: bool) -> list[np.ndarray]:
    """The first k references, then (mirror) their left-right mirror images while fewer than `limit`."""
    out = list(refs[:k])
    if mirror:
        out += [np.ascontiguousarray(r[:, ::-1]) for r in refs[:k]][: max(limit - len(out), 0)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="data/evaluate/bundle")
    p.add_argument("--eval-sets", default="data/eval_sets")
    p.add_argument("--encoders", default="data/encoders")
    p.add_argument("--params", default="params.yaml")
    p.add_argument(
        "--gate", choices=("bundle", "open"), default="bundle", help="the reference gate as evaluated"
    )
    args = p.parse_args()
    cfgs = load_params(args.params, "evaluate", "embed")
    cfg, ecfg = cfgs["evaluate"], cfgs["embed"]
    restorer = Restorer(args.bundle, threads=cfg.threads)
    evaluator = load_encoders(ecfg, args.encoders).evaluator
    limit, kmax = restorer.max_refs, max(max(cfg.modes), 1)
    gate = None if args.gate == "bundle" else False
    for name in ("moderate", "severe"):
        samples, _ = load_set(args.eval_sets, name, cfg.samples, kmax)  # the report's targets
        lq = [s["lq"] for s in samples]

        def score(k: int, mirror: bool, samples=samples, lq=lq):
            refs = [views(s["refs"], k, limit, mirror) for s in samples]
            outs = restorer.restore_in_batches(lq, refs, cfg.batch_size, gate=gate)
            v = per_target(outs, samples, restorer.encoder, evaluator, cfg.copy_tau, ecfg.crop_border)
            return v["psnr"], v["gt_id"]

        blind = score(0, False)
        rows = {}
        for k in range(1, kmax + 1):
            rows[(k, False)] = score(k, False)
            if k < limit:
                rows[(k, True)] = score(k, True)
        print(
            f"\n{name}: {len(samples)} targets, gate {args.gate}; blind PSNR {blind[0].mean():.2f} dB, "
            f"GT-ID {blind[1].mean():.4f}"
        )
        print(
            "| references | Δ GT-ID vs blind | Δ PSNR vs blind (dB) | Δ GT-ID vs the same without mirrors |"
        )
        print("|---|---:|---:|---:|")
        for (k, mirror), (ps, gi) in rows.items():
            dg = paired_bootstrap(gi, blind[1], seed=cfg.seed)
            dp = paired_bootstrap(ps, blind[0], seed=cfg.seed)
            label = f"{k} + {min(k, limit - k)} mirrored" if mirror else str(k)
            vs = "—"
            if mirror:
                dm = paired_bootstrap(gi, rows[(k, False)][1], seed=cfg.seed)
                vs = f"{dm.text()} {dm.verdict}"
            print(f"| {label} | {dg.text()} {dg.verdict} | {dp.text(3)} {dp.verdict} | {vs} |")


if __name__ == "__main__":
    main()
