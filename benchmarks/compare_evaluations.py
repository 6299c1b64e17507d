"""Two models on the same evaluation targets, paired: the evaluate stage's per-target values of model A
against model B's (`data/evaluate/per_target.json` of each run, e.g. this run's and a copy kept from
an earlier one, or one pulled from the DVC cache).

    python benchmarks/compare_evaluations.py A/per_target.json B/per_target.json [--rows "1 reference"]

For each set (both files must hold the same frozen set: its content hash is checked) and row, prints
the paired difference A − B of GT-ID and PSNR, and of the references' own effect (the row minus the
same model's blind mode), each with a 95 % paired bootstrap interval over targets. A difference whose
interval holds zero is printed as "no difference". Measures what a training lever changed on targets
both models restored; nothing is trained or restored here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.stats import paired_bootstrap  # noqa: E402

BLIND = "no reference"


def compare(a: dict, b: dict, rows: list[str] | None, seed: int) -> list[dict]:
    """Paired rows (set, row, metric, A − B mean, lo, hi) for every set and row both files hold."""
    out = []
    for name in sorted(set(a) & set(b)):
        if a[name]["content"] != b[name]["content"]:
            raise SystemExit(
                f"set {name!r}: the two files hold different frozen sets (content {a[name]['content'][:12]} "
                f"vs {b[name]['content'][:12]}); compare runs of the same eval_sets"
            )
        ra, rb = a[name]["rows"], b[name]["rows"]
        for row in rows or sorted(set(ra) & set(rb)):
            if row not in ra or row not in rb:
                continue
            for metric in ("gt_id", "psnr"):
                d = paired_bootstrap(ra[row][metric], rb[row][metric], seed=seed)
                out.append(dict(set=name, row=row, metric=metric, what="A - B", d=d))
                if row != BLIND and BLIND in ra and BLIND in rb:
                    gain_a = np.asarray(ra[row][metric]) - np.asarray(ra[BLIND][metric])
                    gain_b = np.asarray(rb[row][metric]) - np.asarray(rb[BLIND][metric])
                    d = paired_bootstrap(gain_a, gain_b, seed=seed)
                    out.append(dict(set=name, row=row, metric=metric, what="(row - blind): A - B", d=d))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="model A's per_target.json")
    p.add_argument("b", help="model B's per_target.json")
    p.add_argument("--rows", nargs="+", default=None, help="row names (default: every row both hold)")
    p.add_argument("--seed", type=int, default=42, help="the bootstrap's seed (evaluate.seed)")
    args = p.parse_args()
    a, b = (json.loads(Path(f).read_text()) for f in (args.a, args.b))
    results = compare(a, b, args.rows, args.seed)
    for r in results:
        d, digits = r["d"], 4 if r["metric"] == "gt_id" else 3
        print(
            f"{r['set']:>9} | {r['row']:<32} | {r['metric']:<5} | {r['what']:<21} | "
            f"{d.text(digits)} {d.verdict}"
        )
    print(f"compared {len(results)} paired rows of {args.a} (A) against {args.b} (B)")


if __name__ == "__main__":
    main()
