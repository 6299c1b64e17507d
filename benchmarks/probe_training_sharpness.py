"""How often training shows the transformer an input as degraded as the severe test set's.

    python benchmarks/probe_training_sharpness.py        # after `dvc repro evaluate` (about 20 s)

The reference gate (pipelines/reference_gate.py) weighs the reference readout by the degraded input's
sharpness s (mean |Laplacian| of the grey image at the model's resolution): full weight at s ≤ s_blurred,
none at s ≥ s_sharp. This probe degrades the first `--n` training targets with each preset (target i with
default_rng(i)) and prints, per preset, the quantiles of s and the share of inputs inside the gate's
range, with the gate the evaluate stage fitted into the bundle. A readout trained on presets whose inputs
lie almost all above s_sharp learns what references add where the photo already shows the person. It
writes nothing; the figures are in docs/results.md ("Training levers for the severe set").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.config import PRESET_NAMES  # noqa: E402
from pipelines.degradations import get_preset  # noqa: E402
from pipelines.reference_gate import ReferenceGate, sharpness  # noqa: E402
from pipelines.shards import decode_sample, iter_raw, shard_paths  # noqa: E402

DEFAULT_PRESETS = ["iconface_mixed", "iconface_refldm", "refldm_train", "refldm_moderate", "refldm_severe"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--bundle", default="data/evaluate/bundle", help="the evaluated bundle (its gate)")
    ap.add_argument("--n", type=int, default=400, help="training targets per preset")
    ap.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS, choices=PRESET_NAMES)
    args = ap.parse_args()

    meta_file = Path(args.bundle) / "bundle.json"
    if not meta_file.is_file():
        sys.exit(f"{meta_file}: no model bundle (run `dvc repro evaluate` first)")
    g = json.loads(meta_file.read_text()).get("reference_gate")
    if not g:
        sys.exit(f"{meta_file}: the bundle has no reference gate (evaluate.reference_gate is off)")
    gate = ReferenceGate.from_dict(g)
    gts = []
    for raw in iter_raw(shard_paths(args.shards, "train")):
        gts.append(decode_sample(raw)["gt"])
        if len(gts) == args.n:
            break
    print(f"gate: s_sharp {gate.sharp:.3f}, s_blurred {gate.blurred:.3f}; {len(gts)} training targets")
    print(f"{'preset':<16} {'s q10':>7} {'q50':>7} {'q90':>7} {'alpha > 0':>10} {'alpha = 1':>10}")
    for name in tqdm(args.presets, desc="presets", leave=False):
        fn = get_preset(name)
        lq = [fn(x, np.random.default_rng(i))[0] for i, x in enumerate(gts)]
        s, a = sharpness(lq), gate.alpha(lq)
        q = np.quantile(s, [0.1, 0.5, 0.9])
        print(
            f"{name:<16} {q[0]:7.2f} {q[1]:7.2f} {q[2]:7.2f} {100 * (a > 0).mean():9.1f}% "
            f"{100 * (a >= 1).mean():9.1f}%"
        )
    print(f"probe_training_sharpness: {len(args.presets)} presets x {len(gts)} targets")


if __name__ == "__main__":
    main()
